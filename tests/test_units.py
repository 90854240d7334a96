"""Models, aggregators, configuration and counter-based randomness."""

import glob
import math
import os
import time

import numpy as np
import pytest
import torch

from hpcdd import atomic
from hpcdd.aggregators import DNN, average, vote
from hpcdd.config import ModelConfig, build_config, load_toml
from hpcdd.errors import UserError
from hpcdd.models import build_model, count_parameters, default_width_scale
from hpcdd.training import rng
from tests.helpers import ROOT, env_for_tests, run_python


@pytest.mark.parametrize("family,spatial", [("vgg", (15, 15)), ("vgg", (7, 9)), ("resnet20", (16, 16)),
                                            ("resnet32", (8, 8)), ("resnet18", (64, 64)), ("vgg", (6, 8, 8)),
                                            ("resnet20", (4, 8, 8))])
def test_families_forward(family, spatial):
    model = build_model(ModelConfig(family=family), 3, spatial, 7, 0.5)
    out = model(torch.randn(4, 3, *spatial))
    assert out.shape == (4, 7)


def test_local_models_are_proportionally_smaller():
    spec = ModelConfig()
    glob = count_parameters(build_model(spec, 1, (28, 28), 10, 1.0))
    for n in (4, 16):
        local = count_parameters(build_model(spec, 1, (28 // int(math.sqrt(n)),) * 2, 10, default_width_scale(n)))
        assert 0.5 < n * local / glob < 1.5, (n, local, glob)


def test_resnet18_matches_torchvision_parameter_count():
    import torchvision

    ours = count_parameters(build_model(ModelConfig(family="resnet18"), 3, (224, 224), 1000, 1.0))
    assert ours == count_parameters(torchvision.models.resnet18(num_classes=1000))


def test_resnet18_refuses_small_inputs():
    with pytest.raises(UserError, match="at least 32 pixels"):
        build_model(ModelConfig(family="resnet18"), 3, (16, 16), 10)


def test_average_and_vote():
    p = np.array([[[0.6, 0.4, 0.0], [0.0, 0.55, 0.45], [0.1, 0.0, 0.9]],   # one vote each: tie -> summed prob
                  [[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.3, 0.7, 0.0]]])  # class 1 wins 2:1
    assert list(vote(p)) == [2, 1]
    assert list(average(p)) == [2, 1]
    assert list(vote(np.array([[[0.5, 0.5], [0.2, 0.8], [0.9, 0.1]]]))) == [0]  # argmax ties -> first class


def test_dnn_shapes():
    dnn = DNN(4, 10, (32, 16), 0.1)
    assert dnn(torch.rand(5, 4, 10)).shape == (5, 10)


@pytest.mark.parametrize("hidden,dropout", [((64,), 0.1), ((32, 16), 0.3), ((), 0.1), ((24,), 0.0)])
def test_dnn_step_by_hand_is_autograds(hidden, dropout):
    """The DNN's hand-written training step computes autograd's loss, logits and gradients (float64,
    same dropout masks from the same seed), minibatch mean over ``batch`` rows of which it holds some."""
    torch.manual_seed(0)
    dnn = DNN(4, 10, hidden, dropout).double()
    z, y = torch.rand(48, 4, 10, dtype=torch.float64), torch.randint(0, 10, (48,))
    torch.manual_seed(7)
    out = dnn(z)
    total = torch.nn.functional.cross_entropy(out, y, reduction="sum")
    (total / 64).backward()
    expected = [p.grad.clone() for p in dnn.parameters()]
    for p in dnn.parameters():
        p.grad = None
    torch.manual_seed(7)
    total2, out2 = dnn.forward_backward(z, y, 64)
    torch.testing.assert_close(out2, out.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(total2, total.detach(), rtol=0, atol=1e-10)
    for p, g in zip(dnn.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=1e-12)
    assert all(g.abs().sum() > 0 for g in expected)


def test_config_merge(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('seed = 3\n[local]\nepochs = 7\n[coherent.transfer]\nlr = 0.01\n[global]\nbatch_size = 64\n')
    cfg = build_config(load_toml(str(toml)), {"local.epochs": "9", "data": "d", "out": "o"})
    assert (cfg.seed, cfg.local.epochs, cfg.coherent.transfer.lr, cfg.global_.batch_size) == (3, 9, 0.01, 64)


BAD_CONFIG = [({"local.epoch": "3"}, "did you mean 'local.epochs'"), ({"local.epochs": "0"}, "positive number of epochs"),
              ({"global.batch_size": "-1"}, "positive batch size"), ({"local.epochs": "three"}, "expected an integer"),
              ({"model.family": "alexnet"}, "expected one of vgg"), ({"phases": "local,trainall"}, "unknown phase"),
              ({"dnn.input": "softmax"}, "probs or logits"), ({"coherent.strategies": "both"}, "unknown strategy"),
              ({"lr": "0.1"}, "did you mean"), ({"local.lr": "-1"}, "positive learning rate"),
              ({"local.lr": "inf"}, "local.lr = 'inf': expected a finite number"),
              ({"dnn.lr": "nan"}, "dnn.lr = 'nan': expected a finite number"),
              ({"dnn.optimizer": "rmsprop"}, "dnn.optimizer = 'rmsprop': expected sgd, adam or adamw"),
              ({"memory_limit_gb": "1e400"}, "memory_limit_gb = '1e400': expected a finite number")]


@pytest.mark.parametrize("override,needle", BAD_CONFIG, ids=[next(iter(o)) + "=" + next(iter(o.values()))
                                                            for o, _ in BAD_CONFIG])
def test_bad_config_values(override, needle):
    with pytest.raises(UserError, match=needle.replace("(", r"\(")):
        build_config({}, override)


def test_bad_config_files(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("[local]\nepochs = 'five'\n")
    with pytest.raises(UserError, match="c.toml: local.epochs = 'five'"):
        build_config(load_toml(str(toml)), {}, str(toml))
    toml.write_text("[local\n")
    with pytest.raises(UserError, match="invalid TOML"):
        load_toml(str(toml))


@pytest.mark.parametrize("recipe", sorted(glob.glob(os.path.join(ROOT, "docs", "*.toml"))), ids=os.path.basename)
def test_the_documented_recipes_are_valid_configs(recipe):
    """docs/ gives users recipes to pass as --config: a key renamed or a value the checks now refuse must
    break here, not in a user's job. Each must change something, and what its comment runs must name it."""
    cfg = build_config(load_toml(recipe), {}, recipe)
    assert cfg != build_config({}, {})
    assert f"--config docs/{os.path.basename(recipe)}" in open(recipe).read()


@pytest.mark.parametrize("argv", [["--epochs", "10", "--set", "coherent.transfer.epochs=5"],
                                  ["--set", "coherent.transfer.epochs=5", "--epochs", "10"]])
def test_specific_key_wins_over_epochs_shorthand(argv):
    from hpcdd.run import build_parser, resolve_config

    cfg = resolve_config(build_parser().parse_args(["--data", "d", "--out", "o", *argv]))
    assert (cfg.local.epochs, cfg.global_.epochs, cfg.coherent.scratch.epochs, cfg.coherent.transfer.epochs) == \
        (10, 10, 10, 5)


def test_a_relative_data_path_is_recorded_absolute(tmp_path, monkeypatch):
    """RUN/config.json is read by --resume and hpcdd-report from any directory: a --data given relative
    to where the run started is recorded as the absolute path it meant."""
    from hpcdd.run import build_parser, resolve_config

    monkeypatch.chdir(tmp_path)
    cfg = resolve_config(build_parser().parse_args(["--data", "prepared", "--out", "o"]))
    assert cfg.data == str(tmp_path / "prepared")


def test_print_config_is_toml_that_round_trips(tmp_path):

    proc = run_python(["-m", "hpcdd.run", "--print-config", "--set", "dnn.hidden=32,16", "--epochs", "2",
                       "--set", "coherent.strategies=scratch"])
    assert proc.returncode == 0, proc.stderr
    (tmp_path / "run.toml").write_text(proc.stdout)
    again = run_python(["-m", "hpcdd.run", "--print-config", "--config", str(tmp_path / "run.toml")])
    assert again.returncode == 0 and again.stdout == proc.stdout, again.stderr
    cfg = build_config(load_toml(str(tmp_path / "run.toml")), {})
    assert cfg.dnn.hidden == [32, 16] and cfg.local.epochs == 2 and cfg.coherent.strategies == ["scratch"]


def test_counter_based_randomness():
    a = rng.per_sample_ints(rng.mix(0, 4, 1), np.arange(1000), -2, 2, 2)
    b = rng.per_sample_ints(rng.mix(0, 4, 1), np.arange(1000)[::-1], -2, 2, 2)[::-1]
    np.testing.assert_array_equal(a, b)  # a function of the id, not of the position
    assert a.min() == -2 and a.max() == 2 and abs(a.mean()) < 0.2
    assert rng.mix(1, 2) != rng.mix(2, 1)
    np.testing.assert_array_equal(rng.permutation(5, 10), rng.permutation(5, 10))


def test_no_two_trainings_share_a_random_stream():
    """Every training's minibatch-order, shift and dropout streams differ from every other training's, at
    the same seed and across seeds (the coherent strategies once shared streams at seeds s and s+1). The one
    shared stream is by design: the local CNNs and the global CNN see the same minibatch order."""
    from hpcdd.training.rng import stream_of

    def trainings(seed):
        for name in ("global", "dnn", "coherent scratch", "coherent transfer"):
            yield name, stream_of(seed, name)
        for i in range(16):
            yield f"local {i}", stream_of(seed, "local", i)

    orders, dropouts, shifts = {}, {}, {}
    for seed in range(40):
        for name, s in trainings(seed):
            order_owner = "local/global" if s.order_key == () else name
            for epoch in range(3):
                key = tuple(s.batches(epoch, 64, 64)[0][:12])
                assert orders.setdefault(key, (seed, order_owner, epoch)) == (seed, order_owner, epoch), (seed, name)
                shift = tuple(s.shifts(epoch, np.arange(32), 3, 2).reshape(-1))
                assert shifts.setdefault(shift, (seed, order_owner, epoch)) == (seed, order_owner, epoch), (seed, name)
                counters = rng.mix(*s.step_counters(epoch, 0, 0))
                assert dropouts.setdefault(counters, (seed, name, epoch)) == (seed, name, epoch), (seed, name)


@pytest.mark.slow
@pytest.mark.parametrize("compile_,spatial", [("off", (12, 12)), ("on", (12, 12)), ("off", (6, 8, 10))])
def test_accelerated_cnn_computes_what_the_plain_one_does(compile_, spatial):
    """channels_last (and torch.compile, applied in place): same outputs and gradients to float
    tolerance, same state_dict keys, so checkpoints and exports do not change. (No dropout here:
    compiled code draws its dropout masks from its own generator.)"""
    import torch

    from hpcdd.config import ModelConfig, PerformanceConfig
    from hpcdd.models import build_model
    from hpcdd.training.acceleration import accelerate, compiler_problem

    if compile_ == "on" and compiler_problem("cpu"):
        pytest.skip(compiler_problem("cpu"))
    torch.manual_seed(0)
    spec = ModelConfig(widths=[8, 16], dropout=0.0)
    plain = build_model(spec, 1, spatial, 10, 1.0)
    fast = build_model(spec, 1, spatial, 10, 1.0)
    fast.load_state_dict(plain.state_dict())
    fast = accelerate(fast, len(spatial), PerformanceConfig(channels_last="on", compile=compile_), "cpu")
    assert list(fast.state_dict()) == list(plain.state_dict())
    fmt = torch.channels_last_3d if len(spatial) == 3 else torch.channels_last
    conv = next(m for m in fast.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)))
    assert conv.weight.is_contiguous(memory_format=fmt)  # 3D CNNs run channels-last too (channels_last_3d)
    x = torch.randn(6, 1, *spatial)
    plain.eval(), fast.eval()
    torch.testing.assert_close(fast(x), plain(x), rtol=1e-4, atol=1e-5)
    plain.train(), fast.train()
    plain(x).square().sum().backward()
    fast(x).square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), fast.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("family,spatial,members", [("vgg", (12, 12), 1), ("resnet20", (12, 12), 1),
                                                    ("resnet18", (32, 36), 1), ("vgg", (6, 6, 6), 1),
                                                    ("vgg", (12, 12), 3)])
def test_inference_copy_folds_batchnorm_and_computes_the_same(family, spatial, members):
    """``for_inference``: no BatchNorm left (folded into the convolutions), the eval outputs of the
    model (a fused one too), and the model itself untouched and still training."""
    import torch

    from hpcdd.config import ModelConfig, PerformanceConfig
    from hpcdd.fused import Fused
    from hpcdd.training.acceleration import for_inference
    from hpcdd.training.rng import stream_of

    torch.manual_seed(0)
    spec = ModelConfig(family=family, widths=[8, 16, 16, 16])
    nets = [build_model(spec, 1, spatial, 10, 1.0) for _ in range(members)]
    model = nets[0] if members == 1 else Fused(nets, [stream_of(0, "local", i) for i in range(members)])
    x = torch.randn(16, members, *spatial)
    with torch.no_grad():
        model(x)  # BatchNorm statistics that are not the identity
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = for_inference(model, len(spatial), PerformanceConfig(), "cpu")
    assert model.training
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert getattr(folded, "members", 1) == members
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


class _World:
    """The little of a World the watchdog uses; abort records instead of ending the process."""

    rank, size, is_root = 0, 1, True

    def __init__(self):
        self.aborted = []

    def abort(self, code, message):
        self.aborted.append((code, message))


@pytest.mark.slow
def test_a_slow_first_step_is_progress_within_its_limit(tmp_path, monkeypatch):
    """torch.compile compiling a first step for longer than watchdog_timeout is not a deadlock; past
    SLOW_STEP_LIMIT the watchdog fires and says what was running."""
    from hpcdd.layout import RunLayout
    from hpcdd.parallel import watchdog

    layout = RunLayout(str(tmp_path))
    os.makedirs(layout.progress)
    world = _World()
    monkeypatch.setattr(os, "_exit", lambda code: world.aborted.append((code, "exit")))  # the watchdog's last word
    dog = watchdog.Watchdog(layout, world, timeout=1.0).start()
    try:
        with watchdog.slow_step("its first training step (torch.compile compiles in it)"):
            time.sleep(3.5)
        assert world.aborted == []
        monkeypatch.setattr(watchdog, "SLOW_STEP_LIMIT", 0.5)
        with watchdog.slow_step("its first training step (torch.compile compiles in it)"):
            deadline = time.time() + 10
            while not world.aborted and time.time() < deadline:
                time.sleep(0.1)
    finally:
        dog.stop()
    time.sleep(0.2)
    assert [code for code, _ in world.aborted] == [3, 3], world.aborted
    assert "rank 0 has been in its first training step (torch.compile compiles in it) for " in world.aborted[0][1]


def test_a_lock_whose_pid_was_reused_is_stale(tmp_path):
    """RUN/LOCK names its process by pid and start time: a live process that merely has the dead run's pid
    (another start time) does not hold the run; the message for a live owner says how to clear a lock."""
    import json
    import platform
    import subprocess

    from hpcdd.layout import RunLayout
    from hpcdd.parallel import watchdog

    layout = RunLayout(str(tmp_path))
    other = subprocess.Popen(["sleep", "30"])
    try:
        started = watchdog.process_started(other.pid)
        assert started and started != watchdog.process_started(os.getpid())
        for recorded, held in ((started, True), ("another-boot:12345", False), (None, True)):
            with open(layout.lock, "w") as f:
                json.dump({"host": platform.node(), "pid": other.pid, "since": "then", "taken": time.time(),
                           "started": recorded}, f)
            assert (watchdog.lock_owner(layout) is not None) == held, recorded
        with pytest.raises(UserError, match=f"wait for it to end or stop it first \\(if no hpcdd-run uses it, "
                                            f"delete {layout.lock}\\)"):
            watchdog.check_unlocked(layout, "--resume RUN")
    finally:
        other.kill()
        other.wait()


def test_epoch_records_keep_the_last_of_each_epoch(tmp_path):
    """A training resumed from an older checkpoint logs its epochs again: readers take the last record."""
    import json

    from hpcdd.events import epoch_records

    lines = [{"phase": "local", "subdomain": 0, "epoch": 1, "loss": 2.0},
             {"phase": "local", "subdomain": 1, "epoch": 1, "loss": 2.5},
             {"phase": "local", "subdomain": 0, "epoch": 2, "loss": 1.9},
             {"phase": "local", "subdomain": 0, "event": "resume", "epoch": 1, "step": 0},
             {"phase": "local", "subdomain": 0, "epoch": 2, "loss": 1.8},
             {"phase": "coherent", "strategy": "scratch", "epoch": 1, "loss": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    got = epoch_records(str(tmp_path / "metrics.jsonl"))
    assert [(e["phase"], e.get("subdomain"), e["epoch"], e["loss"]) for e in got] == [
        ("local", 0, 1, 2.0), ("local", 1, 1, 2.5), ("local", 0, 2, 1.8), ("coherent", None, 1, 1.0)]


@pytest.mark.slow
def test_gpu_check_stops_at_once_without_a_gpu():
    """benchmarks/gpu_check.py, prepared for a session lent a GPU: where none is visible it says so in one
    line and exits 2 before any work (no data prepared, nothing trained)."""
    import subprocess
    import sys


    t0 = time.time()
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py"], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env=env_for_tests(CUDA_VISIBLE_DEVICES=""))
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and proc.stdout == "" and len(lines) == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert lines[0].startswith("gpu_check: no CUDA device visible") and time.time() - t0 < 60


def test_auc_and_balanced_accuracy_against_their_definitions():
    """AUC: the share of (positive, negative) pairs ranked right, ties half; balanced accuracy: the
    mean recall of the classes present."""
    from hpcdd.metrics import auc, balanced_accuracy, imbalanced

    rng = np.random.default_rng(0)
    for trial in range(100):
        n = int(rng.integers(2, 60))
        score = rng.integers(0, 4, n).astype(float) if trial % 2 else rng.random(n)  # many ties, none
        y = rng.integers(0, 2, n)
        pos, neg = score[y == 1], score[y == 0]
        if len(pos) == 0 or len(neg) == 0:
            assert auc(score, y) is None
            continue
        pairs = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
        assert abs(auc(score, y) - pairs) < 1e-12
    y = np.array([0, 0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 0, 1, 1, 0, 2])
    assert balanced_accuracy(pred, y, 4) == (3 / 4 + 1 / 2 + 1) / 3  # class 3 absent: not counted
    assert imbalanced([229, 69]) and not imbalanced([100, 90, 0])


def test_the_registry_prices_and_lists_each_phases_trainings():
    """The run ETA's cost of each phase and the trainings checked before any starts come from the phase
    registry: training counts 3x a forward pass, validation 1x; coherent sums its strategies; no
    full.h5, no global cost; every training key is a config section with epochs (``--set KEY.epochs``)."""
    from hpcdd.config import all_keys
    from hpcdd.registry import BY_NAME, REGISTRY, Work

    cfg = build_config({"local": {"epochs": 2}, "coherent": {"strategies": ["scratch", "transfer"],
                                                             "scratch": {"epochs": 3}, "transfer": {"epochs": 1}},
                        "global": {"epochs": 4}}, {})
    w = Work(n_train=10, n_eval=2, n_all=15, local=5.0, global_=7.0)
    cost = {p.name: p.cost(cfg, w) for p in REGISTRY}
    assert cost == {"local": 2 * 32 * 5.0, "aggregate": 15 * 5.0, "coherent": (3 + 1) * 32 * 5.0,
                    "global": 4 * 32 * 7.0, "report": 0.0}
    assert BY_NAME["global"].cost(cfg, Work(10, 2, 15, 5.0, None)) is None
    keys = all_keys()
    trainings = [(p.decomposed, name) for p in REGISTRY for name, _ in p.trainings(cfg)]
    assert trainings == [(True, "local"), (True, "coherent.scratch"), (True, "coherent.transfer"), (False, "global")]
    assert all(f"{name}.epochs" in keys for _, name in trainings)


def test_the_run_eta_leaves_the_first_step_out_of_the_rate():
    """The run ETA prices the remaining phases at the rate after a training's first step (its warm-up),
    as the phase ETA does: counted in, three steps into a training the run ETA read 57 minutes of a
    14-minute run."""
    from types import SimpleNamespace

    from hpcdd.progress import Plan, Progress

    p = Progress(None, SimpleNamespace(rank=0, size=1, is_root=True), ["local", "global"],
                 Plan({"global": 3 * 1e6 * 1000}), interval=0, terminal=False)
    p.phase = "local"
    # first step: 128 images in 10 s (warm-up); the next two: 256 images in 0.2 s
    p.current = {"images": 384, "seconds": 10.2, "first_step_seconds": 10.0, "first_step_images": 128,
                 "flops_per_image": 1e6}
    assert p.run_eta(5.0) == pytest.approx(5.0 + 1000 * 0.2 / 256)


def test_the_report_table_is_made_by_the_phases_baseline_first(tmp_path):
    """Each reported phase makes its own rows from what the run wrote; the baseline's come first; rows
    are selected by key, and a CNN-DNN row says where its models are (what the export reads)."""
    from hpcdd.layout import RunLayout
    from hpcdd.registry import table_rows
    from hpcdd.table import PhaseResults

    layout = RunLayout(str(tmp_path))
    hist = [{"epoch": 1, "seconds": 2.0, "val_acc": 0.5}]
    written = {("local",): {"wall_seconds": 10.0, "subdomains": [{"parameters": 5}, {"parameters": 7}]},
               ("aggregate",): {"wall_seconds": 2.0, "dnn": {"parameters": 3}, "seconds": {"dnn": 1.5},
                                "local": [{"val": 0.4, "test": 0.3}, {"val": 0.6, "test": 0.5}],
                                "methods": {k: {"val": 0.7, "test": 0.6} for k in ("average", "vote", "dnn")}},
               ("coherent", "transfer"): {"val": 0.8, "test": 0.75, "train_seconds": 4.0, "epochs": 2,
                                          "comm_seconds": 0.1, "initial_val": 0.7, "best_epoch": 2, "history": hist},
               ("global",): {"val": 0.9, "test": 0.85, "parameters": 40, "wall_seconds": 30.0, "epochs": 3,
                             "best_epoch": 3, "history": hist}}
    for where, body in written.items():
        os.makedirs(os.path.dirname(layout.result(*where)), exist_ok=True)
        atomic.write_json(body, layout.result(*where))
    cfg = build_config({"coherent": {"strategies": ["scratch", "transfer"]}, "local": {"epochs": 5}}, {})
    rows = table_rows(PhaseResults(cfg, layout))
    assert [r["key"] for r in rows] == ["global", "local", "average", "vote", "dnn", "coherent_transfer"]
    by = {r["key"]: r for r in rows}
    assert by["local"]["val"] == [0.4, 0.5, 0.6] and by["local"]["seconds_per_epoch"] == 2.0
    assert by["average"]["train_seconds"] == 12.0 and by["dnn"]["parameters"] == 15
    assert by["coherent_transfer"]["parameters"] == 15 and by["global"]["seconds_per_epoch"] == 10.0
    assert [r.get("cnn_dnn") for r in rows if r.get("cnn_dnn")] == [["aggregate"], ["coherent", "transfer"]]
    assert layout.cnn_dnn(["coherent", "transfer"])[1] == layout.coherent_dnn("transfer")


@pytest.mark.parametrize("says", [True, False])
def test_a_rank_exiting_2_keeps_status_2_when_the_launcher_sigterms_it(says):
    """srun --kill-on-bad-exit SIGTERMs the ranks still exiting once the first exits 2 (CI saw 143, not 2):
    a rank past its agreed error line ignores SIGTERM; the pause at exit stands for MPI_Finalize."""
    import signal
    import subprocess
    import sys

    code = ("import atexit, time\nfrom hpcdd.errors import fail\n"
            "atexit.register(lambda: (print('finalizing', flush=True), time.sleep(1.5)))\n"
            f"fail({'bad input' if says else None!r})\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=env_for_tests())
    assert proc.stdout.readline() == "finalizing\n"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert err.splitlines() == (["error: bad input"] if says else []), err
