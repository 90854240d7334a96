"""What a user sees: progress lines in a batch log, TensorBoard event files, file modes that follow the
umask, a report that names the exported model. One small real 2-rank run, started with umask 027."""

from __future__ import annotations

import glob
import json
import os
import stat
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT, env_for_tests, mpiexec_path, prepare

pytestmark = [pytest.mark.mpi, pytest.mark.slow]

# Minibatches of 16 give the local and the global CNN 68 steps each: a progress line needs 3 steps and
# log_interval seconds since the phase began, and 9 global steps of 128 (0.1-0.2 s on a quiet machine)
# could end before either (CI at 08a90be: no [global] line).
ARGS = ["--threads", "1", "--set", "local.epochs=2", "--set", "dnn.epochs=20", "--set", "global.epochs=1",
        "--set", "coherent.scratch.epochs=1", "--set", "coherent.transfer.epochs=1", "--set", "model.widths=8,16,32",
        "--set", "local.batch_size=16", "--set", "global.batch_size=16", "--set", "log_interval=0.2"]


@pytest.fixture(scope="module")
def user_run(tmp_path_factory, fashion_dir):
    base = tmp_path_factory.mktemp("userview")
    data, run = base / "data", base / "run"
    old = os.umask(0o027)
    try:
        prepare(fashion_dir, data, train=1200, test=400)
    finally:
        os.umask(old)
    cmd = f"umask 027 && exec {mpiexec_path()} -n 2 {sys.executable} -m hpcdd.run --data {data} --out {run} " \
          + " ".join(ARGS)
    proc = subprocess.Popen(["sh", "-c", cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env_for_tests(), cwd=ROOT)
    # junk in RUN/progress while the local phase runs: progress files are advisory, the run goes on
    t0 = time.time()
    while time.time() - t0 < 300 and proc.poll() is None and not (run / "progress").is_dir():
        time.sleep(0.02)
    for name, junk in JUNK.items():
        (run / "progress" / name).write_text(junk)
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    return data, run, subprocess.CompletedProcess(cmd, proc.returncode, out, err)


JUNK = {"rank_0005.json": "[1, 2, 3]", "rank_0006.json": json.dumps({"rank": 6, "phase": "local", "label": "x"}),
        "rank_0007.json": "{not json"}


def test_junk_progress_files_are_skipped_with_one_warning_each(user_run):
    err = user_run[2].stderr
    for name, why in (("rank_0005.json", "not a JSON object"), ("rank_0006.json", "rank 6 is not one of this run's 2"),
                      ("rank_0007.json", "not a JSON object")):
        lines = [ln for ln in err.splitlines() if f"progress/{name}: " in ln]
        assert len(lines) == 1 and why in lines[0] and lines[0].startswith("warning: "), err[-3000:]
    assert "Traceback" not in err


def test_batch_log_shows_progress_of_every_rank_with_eta(user_run):
    out = user_run[2].stdout
    for phase in ("local", "aggregate", "coherent", "global", "report"):
        assert f"[{phase}] " in out
    lines = [ln for ln in out.splitlines() if " img/s; phase ETA " in ln]
    local = [ln for ln in lines if ln.startswith("[local] ")]
    assert local and any("(rank 1)" in ln for ln in local), out[-3000:]  # rank 0 shows rank 1's subdomain too
    assert any(", run ETA ~" in ln for ln in local), local
    assert any(ln.startswith("[global] global CNN epoch 1/1 step ") for ln in lines), lines
    n_train = json.load(open(os.path.join(user_run[0], "manifest.json")))["splits"]["train"]
    assert f"outputs of the 4 local CNNs on the train split ({n_train} samples)" in out
    assert "[aggregate] DNN epoch 20/20: loss " in out


def test_tensorboard_event_files(user_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(str(user_run[1] / "tensorboard" / "events.out.tfevents.*"))
    assert len(files) == 1
    ea = EventAccumulator(files[0], size_guidance={"images": 1})
    ea.Reload()
    tags = ea.Tags()
    for tag in ("local/subdomain_3/val_acc", "local/subdomain_0/loss", "aggregate/model_dnn/val_acc",
                "coherent/strategy_scratch/loss", "coherent/strategy_transfer/comm_seconds", "global/images_per_s",
                "global/lr"):
        assert tag in tags["scalars"], (tag, tags["scalars"])
    assert [e.step for e in ea.Scalars("local/subdomain_3/val_acc")] == [1, 2]
    assert "decomposition" in tags["images"]


def test_outputs_follow_the_umask(user_run):
    data, run, _ = user_run

    def mode(path):
        return stat.S_IMODE(os.stat(path).st_mode)

    for f in ("results.md", "results.json", "config.json", "model.pt", "state.json", "metrics.jsonl",
              "plots/accuracy.png", "local/sub_000.pt", "aggregate/probs_test.npz", "ranks.json"):
        assert mode(run / f) == 0o640, (f, oct(mode(run / f)))
    for d in (run, run / "local", run / "plots"):
        assert mode(d) == 0o750, (d, oct(mode(d)))
    assert mode(data) == 0o750 and mode(data / "manifest.json") == 0o640 and mode(data / "sub_000.h5") == 0o640


def test_report_names_the_exported_model(user_run):
    import json

    run = user_run[1]
    res = json.load(open(run / "results.json"))
    method = res["exported_model"]["method"]
    md = (run / "results.md").read_text()
    assert f"Exported to model.pt (for hpcdd-predict): {method}, the CNN-DNN with the best validation accuracy" in md
    best = max((r for r in res["rows"] if r["method"] == "CNN-DNN" or r["method"].startswith("coherent")),
               key=lambda r: r["val"])
    assert best["method"] == method
    for r in res["rows"]:
        if r.get("best_epoch") == 0:
            assert f"{r['method']} never beat its starting point" in md


def test_a_broken_optional_extra_costs_one_warning_not_the_run(tmp_path, fashion_dir):
    """tensorboard and matplotlib installed but failing to import (a real broken package first on
    PYTHONPATH, as a protobuf mismatch breaks tensorboard): one warning each, the run ends normally, and
    the report says what it skipped."""
    broken = tmp_path / "broken"
    for name in ("tensorboard", "matplotlib"):
        (broken / name).mkdir(parents=True)
        (broken / name / "__init__.py").write_text(
            "raise TypeError('Descriptors cannot be created directly.\\nIf this call came from a _pb2.py file')\n")
    data, run = tmp_path / "data", tmp_path / "run"
    prepare(fashion_dir, data, train=600, test=200)
    env = env_for_tests(PYTHONPATH=f"{broken}:{ROOT}")
    proc = subprocess.run([sys.executable, "-m", "hpcdd.run", "--data", str(data), "--out", str(run),
                           "--phases", "local,aggregate,report", *ARGS], capture_output=True, text=True, timeout=300,
                          env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning: optional extra")]
    assert len(warnings) == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for name in ("tensorboard", "matplotlib"):
        assert any(f"extra {name} is installed but fails to import (TypeError: Descriptors cannot be created "
                   f"directly.)" in w for w in warnings), warnings
    res = json.load(open(run / "results.json"))
    assert set(res["skipped_extras"]) == {"tensorboard", "matplotlib"} and res["plots"] == []
    md = (run / "results.md").read_text()
    assert "Skipped the optional extra tensorboard: installed but fails to import (TypeError: " in md
    assert not (run / "tensorboard").exists()
