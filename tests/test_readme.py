"""The README's two set-up commands are what CI runs, work on a bare machine, and agree with the repo."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()


def _commands():
    section = README.split("## Set up and run")[1].split("\n## ")[0]
    return re.findall(r"```\n(.*?)\n```", section, re.S)


def test_exactly_two_setup_commands_and_ci_runs_the_test_command():
    commands = _commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert commands[1] in ci.splitlines(), "the README's test command must be the line .ci/run executes"


def test_first_command_prepares_and_trains():
    first = _commands()[0]
    assert "hpcdd-prep idx" in first and "mpiexec -n 4" in first and "hpcdd-run" in first


def test_commands_work_on_a_bare_machine():
    """A fresh Debian image has empty package lists: every apt-get install needs an update before it."""
    for command in _commands():
        steps = [s.strip() for s in command.split("&&")]
        installs = [i for i, s in enumerate(steps) if s.startswith("apt-get install")]
        assert installs and all(any(steps[j].startswith("apt-get update") for j in range(i)) for i in installs), command


def test_demo_outputs_are_ignored_by_git():
    ignored = open(os.path.join(ROOT, ".gitignore")).read().split()
    first = _commands()[0]
    data = re.search(r"hpcdd-prep \S+ \S+ (\S+)", first).group(1)
    run = re.search(r"--out (\S+)", first).group(1)
    for path in (data, run):
        assert f"/{path}/" in ignored or f"{path}/" in ignored, path


def test_test_time_is_stated_once_and_consistently():
    setup = README.split("## Set up and run")[1].split("\n## ")[0]
    tests = README.split("\n## Tests")[1]
    stated = re.findall(r"whole test suite.*?about (\d+) minutes", setup, re.S) + \
        re.findall(r"tests in about (\d+) minutes", tests)
    assert len(stated) == 2 and len(set(stated)) == 1, stated


def test_bare_commands_come_after_activate():
    """Examples that call hpcdd-* by name need the venv on PATH: the README says to activate it first."""
    setup = README.split("## Set up and run")[1].split("\n## ")[0]
    assert "source .venv/bin/activate" in setup
    first_bare = min(m.start() for m in re.finditer(r"^(hpcdd-(prep|run|predict)|mpiexec -n)", README, re.M))
    assert README.index("source .venv/bin/activate") < first_bare


def test_cli_usage_names_are_the_installed_commands():
    cfg = open(os.path.join(ROOT, "setup.cfg")).read()
    for command, module in (("hpcdd-prep", "data_prep/cli.py"), ("hpcdd-run", "hpcdd/run.py"),
                            ("hpcdd-predict", "hpcdd/predict.py"), ("hpcdd-report", "hpcdd/report.py")):
        assert f"{command} = " in cfg
        assert f'prog="{command}"' in open(os.path.join(ROOT, module)).read(), module
