"""Fused local CNNs (hpcdd/fused.py): several local CNNs of one rank as one grouped model compute and
train what the same CNNs compute and train one after another."""

import os

import pytest
import torch

from hpcdd.config import ModelConfig, TrainConfig
from hpcdd.data import MemberData, ShardReader, SplitData
from hpcdd.fused import Fused, fusable
from hpcdd.manifest import load_manifest
from hpcdd.models import build_model
from hpcdd.training.fit import Fit, fit
from hpcdd.training.rng import seed_torch, stream_of
from tests.helpers import prepare


def members(family="vgg", shape=(9, 11), count=3, dims_in=1):
    spec = ModelConfig(family=family, widths=[8, 16] if family == "vgg" else [8, 16, 32])
    models = []
    for i in range(count):
        torch.manual_seed(100 + i)
        models.append(build_model(spec, dims_in, shape, 10, 1.0))
    return models


@pytest.mark.parametrize("family,shape", [("vgg", (9, 11)), ("resnet20", (12, 12)), ("vgg", (6, 7, 5))])
def test_fused_model_computes_each_members_outputs_and_gradients(family, shape):
    models = members(family, shape)
    streams = [stream_of(0, "local", i) for i in range(len(models))]
    assert all(fusable(m) for m in models)
    fused = Fused(models, streams)
    x = [torch.randn(16, 1, *shape, generator=torch.Generator().manual_seed(i)) for i in range(len(models))]
    y = torch.randint(0, 10, (16,))
    fused.train()
    fused.seed_step(2, 5)
    out = fused(torch.cat(x, 1))
    assert out.shape == (16, len(models), 10)
    torch.nn.functional.cross_entropy(out.transpose(1, 2), y[:, None].expand(16, len(models)), reduction="sum").backward()
    for i, (m, xi) in enumerate(zip(models, x)):
        m.train()
        seed_torch(*streams[i].step_counters(2, 5))  # dropout as the unfused step seeds it
        alone = m(xi)
        torch.testing.assert_close(out[:, i], alone, rtol=1e-4, atol=1e-5)
        torch.nn.functional.cross_entropy(alone, y, reduction="sum").backward()
    grads = fused.member_state_dicts()  # shapes and keys of the members
    for i, m in enumerate(models):
        assert grads[i].keys() == m.state_dict().keys()
        for key, value in m.state_dict().items():
            torch.testing.assert_close(grads[i][key], value)  # BatchNorm running stats updated alike
    fused.eval()  # prediction (the aggregate phase runs fused local CNNs fused): running statistics
    with torch.no_grad():
        out = fused(torch.cat(x, 1))
        for i, (m, xi) in enumerate(zip(models, x)):
            torch.testing.assert_close(out[:, i], m.eval()(xi), rtol=1e-4, atol=1e-5)
    fused_grads = {n: p.grad for n, p in fused.net.named_parameters()}
    for name, _ in models[0].named_parameters():
        parts = fused._split(name, fused_grads[name])
        for i, m in enumerate(models):
            torch.testing.assert_close(parts[i], dict(m.named_parameters())[name].grad, rtol=1e-4, atol=1e-5)


def near(got, want, tol=1e-8):
    """Differences in the last bits grow with every step of a training (in float32, channels_last
    against the default layout alone moves Adam's first moments by 2 % in 20 steps), so the trainings
    compared here run in float64, where equal math stays equal to ~1e-12."""
    got, want = got.double(), want.double()
    assert (got - want).norm() <= tol * want.norm() + 1e-6, float((got - want).norm() / (want.norm() + 1e-12))


def in_float64(model):
    model.double().register_forward_pre_hook(lambda _, args: (args[0].double(),))
    return model


@pytest.fixture(scope="module")
def grid_data(tmp_path_factory, fashion_dir):
    out = tmp_path_factory.mktemp("fused") / "d"
    prepare(fashion_dir, out, grid="4x4", overlap=2, train=600, test=100, extra=("--margin", "1"))
    return load_manifest(str(out))


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_fused_training_matches_training_one_after_another(grid_data, tmp_path, optimizer):
    """Subdomains 1 and 2 of a 4x4 grid (both 9x11): best weights, histories and the per-member
    checkpoints (optimizer state included) of the fused training equal the unfused ones."""
    m = grid_data
    subs = [1, 2]
    assert m.subimage_shape(1) == m.subimage_shape(2)
    t = TrainConfig(epochs=2, batch_size=64, augment_shift=1, optimizer=optimizer, lr=3e-3 if optimizer == "adam" else 0.05)
    spec = ModelConfig(widths=[8, 16], hidden=32)

    def split(i, name):
        return SplitData.load(ShardReader(m, i), name)

    def model(i):
        torch.manual_seed(i)
        return in_float64(build_model(spec, 1, m.subimage_shape(i), m.k, 1.0))

    alone = {}
    for i in subs:
        alone[i], = fit(model(i), Fit(name=f"local {i}", train=split(i, "train"), val=split(i, "val"), t=t,
                                      stream=stream_of(0, "local", i), device="cpu",
                                      checkpoint=[str(tmp_path / f"alone_{i}.ckpt.pt")]))
    streams = [stream_of(0, "local", i) for i in subs]
    fused = in_float64(Fused([model(i) for i in subs], streams))
    events = {i: [] for i in subs}
    states = fit(fused, Fit(name="local fused", train=MemberData([split(i, "train") for i in subs]),
                            val=MemberData([split(i, "val") for i in subs]), t=t, stream=streams[0], device="cpu",
                            checkpoint=[str(tmp_path / f"fused_{i}.ckpt.pt") for i in subs],
                            on_epoch=[events[i].append for i in subs]))
    assert len(states) == 2
    for state, i in zip(states, subs):
        ref = alone[i]
        assert state.best_epoch == ref.best_epoch and state.images == ref.images
        assert [e["epoch"] for e in events[i]] == [1, 2]
        for a, b in zip(state.history, ref.history):
            assert abs(a["loss"] - b["loss"]) < 1e-9 and a["val_acc"] == b["val_acc"]
        for key, value in ref.best["model"].items():
            near(state.best["model"][key], value)
        got = torch.load(tmp_path / f"fused_{i}.ckpt.pt", weights_only=True)
        want = torch.load(tmp_path / f"alone_{i}.ckpt.pt", weights_only=True)
        assert got["optimizer"]["param_groups"] == want["optimizer"]["param_groups"]
        for index, entry in want["optimizer"]["state"].items():
            for k, v in entry.items():
                near(got["optimizer"]["state"][index][k], v)
        assert got["state"]["epoch"] == 2 and os.path.getsize(tmp_path / f"fused_{i}.ckpt.pt") < \
            1.5 * os.path.getsize(tmp_path / f"alone_{i}.ckpt.pt")


@pytest.mark.slow
def test_fused_training_stopped_mid_epoch_resumes_fused_or_alone(grid_data, tmp_path):
    """A stop mid-epoch leaves each member's checkpoint; resuming them fused, or each alone, or fused
    after a kill between the two members' writes (the second member holds only the previous point,
    so both resume from it), ends where the uninterrupted fused training ends."""
    from hpcdd.parallel.preemption import Preempted

    m = grid_data
    subs = [0, 3]  # both 9x9
    t = TrainConfig(epochs=2, batch_size=64, augment_shift=1)
    spec = ModelConfig(widths=[8, 16], hidden=32)
    streams = [stream_of(0, "local", i) for i in subs]

    def train(name, stop=None, members=subs):
        models = []
        for i in members:
            torch.manual_seed(i)
            models.append(in_float64(build_model(spec, 1, m.subimage_shape(i), m.k, 1.0)))
        model = models[0] if len(members) == 1 else in_float64(Fused(models, [streams[subs.index(i)] for i in members]))

        def data(split):
            parts = [SplitData.load(ShardReader(m, i), split) for i in members]
            return parts[0] if len(members) == 1 else MemberData(parts)
        paths = [str(tmp_path / name / f"sub_{i}.ckpt.pt") for i in members]
        hooks = [lambda state: resumed_at.append((state.epoch, state.step))] * len(members)
        return fit(model, Fit(name=name, train=data("train"), val=data("val"), t=t,
                              stream=streams[subs.index(members[0])], device="cpu", stop=stop,
                              checkpoint=paths, on_resume=hooks))

    resumed_at = []
    (tmp_path / "whole").mkdir()
    whole = train("whole")
    for resumed in ("fused", "alone", "torn"):
        (tmp_path / resumed).mkdir()
        calls = iter(range(1000))
        with pytest.raises(Preempted):
            train(resumed, stop=lambda: next(calls) == 13)  # in epoch 2 (9 steps an epoch)
        for i in subs:
            saved = torch.load(tmp_path / resumed / f"sub_{i}.ckpt.pt", weights_only=True)
            assert (saved["state"]["epoch"], saved["state"]["step"]) == (1, 4)
        if resumed == "torn":
            os.unlink(tmp_path / resumed / f"sub_{subs[1]}.ckpt.pt")  # its .prev, the end of epoch 1, stays
        resumed_at.clear()
        if resumed in ("fused", "torn"):
            states = train(resumed)
        else:
            states = [train(resumed, members=[i])[0] for i in subs]
        assert resumed_at == [(1, 0) if resumed == "torn" else (1, 4)] * 2, resumed
        for got, want in zip(states, whole):
            assert got.best_epoch == want.best_epoch and got.images == want.images
            for key, value in want.best["model"].items():
                near(got.best["model"][key], value)


@pytest.mark.slow
def test_bf16_autocast_trains_in_bfloat16_and_learns(grid_data):
    """performance.autocast = "bf16" (the GPU option, run here on the CPU): the CNN's convolutions
    compute in bfloat16, the loss in float32, and a local CNN still learns (chance: 0.1)."""
    from hpcdd.config import PerformanceConfig
    from hpcdd.training.acceleration import configure

    m = grid_data
    seen = []
    torch.manual_seed(0)
    model = build_model(ModelConfig(widths=[8, 16], hidden=32), 1, m.subimage_shape(5), m.k, 1.0)
    model.features[0].register_forward_hook(lambda _, __, out: seen.append(out.dtype))
    try:
        configure(PerformanceConfig(autocast="bf16"))
        state, = fit(model, Fit(name="local 5", train=SplitData.load(ShardReader(m, 5), "train"),
                               val=SplitData.load(ShardReader(m, 5), "val"), t=TrainConfig(epochs=4, batch_size=32),
                               stream=stream_of(0, "local", 5), device="cpu"))
    finally:
        configure(PerformanceConfig())
    assert set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert state.best_val > 0.3, state.history


def test_coherent_resume_refuses_other_groups(tmp_path):
    """A coherent checkpoint written with other fused groups than this run's (its optimizer state has
    their layout) stops the resume with one line naming the file; the same groups pass."""
    from types import SimpleNamespace

    from hpcdd import atomic
    from hpcdd.errors import UserError
    from hpcdd.phases.coherent import check_groups

    path = str(tmp_path / "rank_0000.ckpt.pt")
    atomic.save({"weights": {"local": {}, "dnn": {}, "groups": [[0], [1]]}}, path)
    check_groups(path, SimpleNamespace(groups={(0,): None, (1,): None}))
    with pytest.raises(UserError, match=r"rank_0000.ckpt.pt: written with .*\[\[0\], \[1\]\].*\[\[0, 1\]\]"):
        check_groups(path, SimpleNamespace(groups={(0, 1): None}))
