"""The README's two set-up commands are what CI runs and what the package provides."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Set up and run")[1].split("\n## ")[0]
    return re.findall(r"```\n(.*?)\n```", section, re.S)


def test_exactly_two_setup_commands_and_ci_runs_the_test_command():
    commands = _commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert commands[1] in ci.splitlines(), "the README's test command must be the line .ci/run executes"


def test_first_command_prepares_and_trains():
    first = _commands()[0]
    assert "hpcdd-prep idx" in first and "mpiexec -n 4" in first and "hpcdd-run" in first
