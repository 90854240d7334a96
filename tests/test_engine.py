"""The training engine in one process with a tiny model (the fast layer: seconds, no MPI): a stop
mid-epoch resumes to the bits of the uninterrupted training, checkpoints are atomic, a torn
checkpoint is refused alone and skipped for the ``.prev`` one every rank holds, the newest common
point is the one resumed from, and an epoch's logged learning rate is the one it trained at."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from hpcdd.config import TrainConfig
from hpcdd.errors import UserError
from hpcdd.parallel.preemption import Preempted
from hpcdd.training.engine import Checkpoints, Hooks, Loop, Trained, make_optimizer, make_scheduler, run_loop
from hpcdd.training.rng import stream_of

N, D, K = 96, 8, 3


def tiny(path=None, stop=None, agree=None, epochs=3):
    """A linear classifier on a learnable rule (the class is the largest of three features)."""
    g = torch.Generator().manual_seed(1)
    x, xv = torch.randn(N, D, generator=g), torch.randn(48, D, generator=g)
    y, yv = x[:, :K].argmax(1), xv[:, :K].argmax(1)
    torch.manual_seed(0)
    model = torch.nn.Linear(D, K)
    t = TrainConfig(epochs=epochs, batch_size=16, lr=0.05)
    opt = make_optimizer(list(model.parameters()), t)
    stream = stream_of(0, "local", 0)

    def step(epoch, step, rows):
        idx = torch.from_numpy(rows)
        out = model(x[idx])
        loss = F.cross_entropy(out, y[idx], reduction="sum")
        opt.zero_grad()
        (loss / len(rows)).backward()
        opt.step()
        return loss.detach(), (out.argmax(1) == y[idx]).sum(), len(rows)

    def evaluate():
        with torch.no_grad():
            return float((model(xv).argmax(1) == yv).float().mean())

    trained = Trained(weights=lambda: [{"model": model.state_dict()}],
                      load_weights=lambda w: model.load_state_dict(w[0]["model"]), optimizer=opt,
                      scheduler=make_scheduler(opt, t), set_train=model.train)
    loop = Loop(name="tiny", epochs=epochs, batches=lambda epoch: stream.batches(epoch, N, t.batch_size), step=step,
                evaluate=evaluate, trained=trained, hooks=Hooks(stop=stop),
                checkpoints=Checkpoints([path], agree=agree) if path else None)
    return loop, model


def stop_after(polls: int):
    count = [0]

    def stop():
        count[0] += 1
        return count[0] > polls

    return stop


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_stop_mid_epoch_resumes_to_the_uninterrupted_bits(tmp_path):
    loop, model = tiny()
    whole, = run_loop(loop, "cpu")
    assert whole.best_val > 0.7 and len(whole.history) == 3  # it learns the rule
    path = str(tmp_path / "ckpt.pt")
    for polls in (9, 5):  # 6 steps an epoch: stopped in epoch 2, then again in epoch 3 of the resumed run
        loop, _ = tiny(path, stop=stop_after(polls))
        with pytest.raises(Preempted):
            run_loop(loop, "cpu")
    loop, resumed_model = tiny(path)
    resumed, = run_loop(loop, "cpu")
    assert same(resumed_model.state_dict(), model.state_dict())
    assert same(resumed.best["model"], whole.best["model"]) and resumed.best_epoch == whole.best_epoch
    strip = [{k: v for k, v in e.items() if "seconds" not in k and "images_per_s" not in k} for e in whole.history]
    assert [{k: v for k, v in e.items() if "seconds" not in k and "images_per_s" not in k}
            for e in resumed.history] == strip
    assert [e["lr"] for e in whole.history][0] == 0.05 and whole.history[1]["lr"] < 0.05  # cosine, as trained


def test_checkpoints_are_atomic_and_a_torn_one_alone_is_refused(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    loop, _ = tiny(path, epochs=2)
    run_loop(loop, "cpu")
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left, no .prev without agree
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    loop, _ = tiny(path, epochs=2)
    with pytest.raises(UserError, match="ckpt.pt"):
        run_loop(loop, "cpu")


def test_with_per_rank_checkpoints_a_torn_one_falls_back_to_the_point_every_rank_holds(tmp_path):
    """``agree`` (in a run: an allgather over ranks) picks the newest point all ranks hold; the
    previous checkpoint is kept as ``.prev`` so a rank killed while writing still holds one."""
    path = str(tmp_path / "ckpt.pt")
    asked = []

    def agree(points):
        asked.append(points)
        return max(p for p in points if p in {(1, 0), (2, 0)}) if points else None  # the other rank's points

    loop, _ = tiny(path, agree=agree)
    run_loop(loop, "cpu")  # three epochs: ckpt.pt holds (3, 0), .prev (2, 0)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "ckpt.pt.prev"]
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    epochs_seen = []
    loop, _ = tiny(path, agree=agree)
    loop.hooks.on_resume = [lambda state: epochs_seen.append((state.epoch, state.step))]
    again, = run_loop(loop, "cpu")
    assert asked[-1] == [(2, 0)] and epochs_seen == [(2, 0)]  # the torn (3, 0) is not a point this rank holds
    assert [e["epoch"] for e in again.history] == [1, 2, 3]


def test_a_training_checkpoint_tells_its_points_and_weights_and_is_discarded_whole(tmp_path):
    """What phases ask of a checkpoint (fusing members that hold a common point, checking the layout a
    resume would load, removing it when done) without reading its format: no file is the start
    (0, 0); a torn file is a point of its own; ``discard`` removes PATH and PATH.prev."""
    from hpcdd.training.engine import TrainingCheckpoint

    path = str(tmp_path / "ckpt.pt")
    ck = TrainingCheckpoint(path)
    assert ck.points() == {(0, 0)} and list(ck.weights()) == []
    loop, _ = tiny(path, agree=lambda points: max(points) if points else None)
    run_loop(loop, "cpu")  # three epochs: ckpt.pt holds (3, 0), .prev (2, 0)
    assert ck.points() == {(3, 0), (2, 0)}
    assert [f for f, w in ck.weights()] == [path, path + ".prev"] and all("weight" in w["model"] for _, w in ck.weights())
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    assert ck.points() == {path, (2, 0)} and [f for f, _ in ck.weights()] == [path + ".prev"]
    with pytest.raises(UserError, match="ckpt.pt"):
        ck.held(current_only=True)
    ck.discard()
    assert os.listdir(tmp_path) == []


def test_a_checkpoint_interval_skips_epoch_checkpoints_and_the_resume_replays_exactly(tmp_path):
    """With ``Checkpoints.interval`` longer than the training, the first and the last epochs write one;
    a crash in epoch 3 resumes from epoch 1 and replays epoch 2 to the uninterrupted bits."""
    loop, model = tiny()
    whole, = run_loop(loop, "cpu")
    path = str(tmp_path / "ckpt.pt")
    loop, _ = tiny(path)
    loop.checkpoints.interval = 3600.0
    step = loop.step

    def crash_in_epoch_3(epoch, i, rows):
        if epoch == 2:
            raise RuntimeError("killed")
        return step(epoch, i, rows)

    loop.step = crash_in_epoch_3
    with pytest.raises(RuntimeError, match="killed"):
        run_loop(loop, "cpu")
    assert torch.load(path, weights_only=True)["state"]["epoch"] == 1  # epoch 2's was skipped
    loop, resumed_model = tiny(path)
    loop.checkpoints.interval = 3600.0
    points = []
    loop.hooks.on_resume = [lambda state: points.append(state.epoch)]
    resumed, = run_loop(loop, "cpu")
    assert points == [1] and same(resumed_model.state_dict(), model.state_dict())
    assert same(resumed.best["model"], whole.best["model"])
    assert torch.load(path, weights_only=True)["state"]["epoch"] == 3  # the last epoch always writes
