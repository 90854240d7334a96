"""The phases of a run, in order: local, aggregate, coherent, global, report.

Each phase is resumable: it writes its results under ``RUN/<phase>/`` and rank 0 marks it complete
in ``RUN/state.json``; a phase that is already complete is skipped, and an interrupted one
continues from the checkpoints it left (epoch by epoch).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint, rng
from .aggregators import DNN, accuracy, average, vote
from .coherent import DistributedCoherent
from .config import Config, TrainConfig
from .data import SPLITS, ShardReader, SplitData
from .models import ModelSpec, build_model, count_parameters, default_width_scale
from .parallel import World, allreduce_mean_, bcast_array, gather_rows, slice_rows
from .training import (TAG_DNN, TAG_GLOBAL, TAG_INIT, Fit, accuracy_of, buffers_of, epoch_batches, epoch_shifts,
                       fit, logits_of, make_optimizer, make_scheduler, restore_training, seed_step, training_state)


@dataclass
class Context:
    """What every phase needs: configuration, world, data and the run directory."""

    cfg: Config
    world: World
    run_dir: str
    manifest: dict
    state: dict = field(default_factory=dict)
    stop: object = None  # preemption.StopFlag
    _data: dict = field(default_factory=dict)

    def sync(self) -> None:
        """The end of a phase's parallel work: every rank meets here, then all agree whether to stop."""
        from .preemption import Preempted

        self.world.idle_barrier()
        if self.stop is not None and self.stop.agree():
            raise Preempted(synced=True)

    def stop_independent(self):
        """The local phase's stop poll (ranks not in lockstep; replicas agree in their group)."""
        if self.stop is None:
            return None
        group = self.world.group if self.world.own.replicas > 1 else None
        return lambda: self.stop.poll_independent(group)

    def stop_collective(self):
        return None if self.stop is None else self.stop.poll_collective

    @property
    def n(self) -> int:
        return int(np.prod(self.manifest["grid"]))

    @property
    def k(self) -> int:
        return len(self.manifest["classes"])

    @property
    def device(self):
        return self.world.device

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec.of(self.cfg.model)

    @property
    def width_scale(self) -> float:
        return self.cfg.model.local_width_scale or default_width_scale(self.n)

    def path(self, *parts: str) -> str:
        return os.path.join(self.run_dir, *parts)

    def log(self, message: str) -> None:
        if self.world.is_root:
            print(message, flush=True)

    def event(self, **fields) -> None:
        """Append one JSON line to RUN/metrics.jsonl (rank 0 only: one owner per file)."""
        if self.world.is_root:
            with open(self.path("metrics.jsonl"), "a") as f:
                f.write(json.dumps(fields) + "\n")

    def data(self, index: int | None, split: str) -> SplitData:
        """A split of a shard (``index`` None: full.h5), loaded once per process."""
        key = (index, split)
        if key not in self._data:
            reader = ShardReader(self.cfg.data, index, self.manifest)
            data = SplitData.load(reader, split, int(self.cfg.memory_limit_gb * (1 << 30)))
            self._data[key] = data.to_device(self.device) if self.cfg.data_on_device else data
        return self._data[key]

    def release(self, index: int | None = None) -> None:
        for key in [k for k in self._data if index is None or k[0] == index]:
            self._data.pop(key).reader.close()

    def local_model(self, i: int) -> torch.nn.Module:
        """Local CNN ``i``, initialised from (seed, i) whatever rank builds it."""
        c = self.manifest["image_shape"][0]
        spatial = [b - a for a, b in self.manifest["boxes"][i]]
        torch.manual_seed(rng.mix(self.cfg.seed, TAG_INIT, i))
        return build_model(self.spec, c, spatial, self.k, self.width_scale).to(self.device)

    def global_model(self) -> torch.nn.Module:
        c, *spatial = self.manifest["image_shape"]
        torch.manual_seed(rng.mix(self.cfg.seed, TAG_INIT, TAG_GLOBAL))
        return build_model(self.spec, c, spatial, self.k, 1.0).to(self.device)

    def dnn(self) -> DNN:
        torch.manual_seed(rng.mix(self.cfg.seed, TAG_INIT, TAG_DNN))
        d = self.cfg.dnn
        return DNN(self.n, self.k, tuple(d.hidden), d.dropout).to(self.device)

    def mark_done(self, phase: str, **info) -> None:
        self.state.setdefault("phases", {})[phase] = dict(done=True, **info)
        if self.world.is_root:
            checkpoint.write_json(self.state, self.path("state.json"))

    def done(self, phase: str) -> bool:
        return bool(self.state.get("phases", {}).get(phase, {}).get("done"))


def _epoch_logger(ctx: Context, phase: str, label: str, **ids):
    def on_epoch(event):
        ctx.log(f"[{phase}] {label} epoch {event['epoch']}/{event['epochs']}: loss {event['loss']:.4f} "
                f"train {event['train_acc']:.4f} val {event['val_acc']:.4f} "
                f"({event['seconds']:.1f} s, {event['images_per_s']:.0f} img/s)")
    return on_epoch


# ------------------------------------------------------------------------------------- local
def phase_local(ctx: Context) -> None:
    """Every rank trains the local CNNs of its subdomains, one after another; no communication."""
    own = ctx.world.own
    os.makedirs(ctx.path("local"), exist_ok=True)
    t0 = time.perf_counter()
    summaries = []
    for i in own.subdomains:
        final = ctx.path("local", f"sub_{i:03d}.pt")
        if os.path.exists(final):
            saved = checkpoint.load(final)
            summaries.append(saved["summary"])
            continue
        model = ctx.local_model(i)
        ckpt = ctx.path("local", f"sub_{i:03d}.ckpt.pt")
        result = fit(model, Fit(
            train=ctx.data(i, "train"), val=ctx.data(i, "val"), t=ctx.cfg.local, seed=ctx.cfg.seed, key=(0, i),
            device=ctx.device, eval_batch=ctx.cfg.eval_batch_size, comm=ctx.world.group if own.replicas > 1 else None,
            ckpt_path=ckpt, writer=own.replica == 0,
            on_epoch=_epoch_logger(ctx, "local", f"subdomain {i}"), stop=ctx.stop_independent()))
        summary = {"subdomain": i, "best_val": result.best_val, "best_epoch": result.best_epoch,
                   "train_seconds": result.train_seconds, "images": result.images,
                   "parameters": count_parameters(model), "history": result.history}
        if own.replica == 0:
            checkpoint.save({"model": result.best_state, "summary": summary, "subdomain": i}, final)
            if os.path.exists(ckpt):
                os.unlink(ckpt)
        summaries.append(summary)
    wall = time.perf_counter() - t0
    ctx.sync()
    everything = ctx.world.allgather_obj((summaries, wall) if own.replica == 0 else ([], wall))
    if ctx.world.is_root:
        subs = sorted((s for part, _ in everything for s in part), key=lambda s: s["subdomain"])
        for s in subs:
            for e in s["history"]:
                ctx.event(phase="local", subdomain=s["subdomain"], **e)
        walls = [w for _, w in everything]
        checkpoint.write_json({"subdomains": [{k: v for k, v in s.items() if k != "history"} for s in subs],
                               "wall_seconds": max(walls), "rank_seconds": walls}, ctx.path("local", "result.json"))
    ctx.mark_done("local")


# --------------------------------------------------------------------------------- aggregate
def gather_at_root(ctx: Context, split: str, compute) -> np.ndarray | None:
    """(n, N, K) outputs of every subdomain on a split, at rank 0 (None elsewhere).

    ``compute()`` gives this rank's (n_owned, n, K) block; only the first replica of a subdomain
    computes it, the others send nothing.
    """
    n = ctx.manifest["splits"][split]
    mine = compute() if ctx.world.own.replica == 0 else np.zeros((0, n, ctx.k), np.float32)
    full = gather_rows(ctx.world, mine)
    return None if full is None else np.ascontiguousarray(full.transpose(1, 0, 2))


def gather_local_outputs(ctx: Context, models: dict, split: str) -> np.ndarray | None:
    """(n, N, K) logits of every local CNN on a split, at rank 0 (None elsewhere)."""
    return gather_at_root(ctx, split, lambda: np.stack([
        logits_of(models[i], ctx.data(i, split), ctx.device, ctx.cfg.eval_batch_size)
        for i in ctx.world.own.subdomains]))


def load_local_models(ctx: Context, directory: str) -> dict:
    models = {}
    for i in ctx.world.own.subdomains:
        model = ctx.local_model(i)
        model.load_state_dict(checkpoint.load(os.path.join(directory, f"sub_{i:03d}.pt"))["model"])
        models[i] = model
    return models


def dnn_features(logits: np.ndarray, kind: str) -> torch.Tensor:
    z = torch.from_numpy(logits)
    return torch.softmax(z, dim=-1) if kind == "probs" else z


def train_dnn(ctx: Context, feats: dict, labels: dict) -> tuple[dict, dict]:
    """Rank 0: train the DNN on the local outputs, select on validation, checkpoint every epoch."""
    d = ctx.cfg.dnn
    model = ctx.dnn()
    opt = torch.optim.Adam(model.parameters(), lr=d.lr, weight_decay=d.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=d.epochs)
    x, y = feats["train"].to(ctx.device), labels["train"].to(ctx.device)
    best, best_val, best_epoch, start, seconds = None, -1.0, 0, 0, 0.0
    ckpt = ctx.path("aggregate", "dnn.ckpt.pt")
    if os.path.exists(ckpt):
        s = restore_training(ckpt, opt, sched, ctx.device)
        model.load_state_dict(s["model"])
        best, best_val, best_epoch, start, seconds = s["best"], s["best_val"], s["best_epoch"], s["epoch"], s["seconds"]
    t0 = time.perf_counter()
    for epoch in range(start, d.epochs):
        model.train()
        for step, rows in enumerate(epoch_batches(ctx.cfg.seed + TAG_DNN, epoch, len(y), d.batch_size)):
            seed_step(ctx.cfg.seed, TAG_DNN, epoch, step)
            idx = torch.from_numpy(rows).to(ctx.device)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        model.eval()
        with torch.no_grad():
            val = float((model(feats["val"].to(ctx.device)).argmax(1).cpu() == labels["val"]).float().mean())
        ctx.event(phase="aggregate", model="dnn", epoch=epoch + 1, loss=float(loss.detach()), val_acc=val)
        if val > best_val:
            best_val, best_epoch = val, epoch + 1
            best = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        checkpoint.save(training_state(opt, sched, model=model.state_dict(), epoch=epoch + 1, best=best,
                                       best_val=best_val, best_epoch=best_epoch,
                                       seconds=seconds + time.perf_counter() - t0), ckpt)
    return best, {"best_val": best_val, "best_epoch": best_epoch, "train_seconds": seconds + time.perf_counter() - t0,
                  "parameters": count_parameters(model)}


def flatten_state(state: dict) -> np.ndarray:
    return np.concatenate([v.detach().cpu().float().reshape(-1).numpy() for v in state.values()])


def unflatten_state(template: dict, flat: np.ndarray) -> dict:
    out, offset = {}, 0
    for k, v in template.items():
        out[k] = torch.from_numpy(flat[offset:offset + v.numel()].copy()).view_as(v).to(v.dtype)
        offset += v.numel()
    return out


def labels_of(ctx: Context, split: str) -> torch.Tensor:
    return ctx.data(ctx.world.own.subdomains[0], split).y


def phase_aggregate(ctx: Context) -> None:
    """Gather the local probabilities at rank 0, train the DNN there, compare with average and vote,
    then Bcast the DNN weights to every rank."""
    t0 = time.perf_counter()
    os.makedirs(ctx.path("aggregate"), exist_ok=True)
    models = load_local_models(ctx, ctx.path("local"))
    logits = {split: gather_local_outputs(ctx, models, split) for split in SPLITS}
    kind = ctx.cfg.dnn.input
    dnn = ctx.dnn()
    flat = None
    if ctx.world.is_root:
        labels = {s: labels_of(ctx, s) for s in SPLITS}
        feats = {s: dnn_features(logits[s], kind) for s in SPLITS}
        state, info = train_dnn(ctx, feats, labels)
        flat = flatten_state(state)
    ctx.world.idle_barrier()
    flat = bcast_array(ctx.world, flat)
    dnn.load_state_dict(unflatten_state(dnn.state_dict(), flat))
    if ctx.world.is_root:
        dnn.eval()
        results = {"methods": {}, "local": []}
        for s in SPLITS:
            probs = torch.softmax(torch.from_numpy(logits[s]), dim=-1).numpy()
            y = labels[s].numpy()
            np.savez(ctx.path("aggregate", f".probs_{s}.tmp.npz"), probs=probs, logits=logits[s], y=y)
            os.replace(ctx.path("aggregate", f".probs_{s}.tmp.npz"), ctx.path("aggregate", f"probs_{s}.npz"))
            with torch.no_grad():
                pred_dnn = dnn(feats[s].to(ctx.device)).argmax(1).cpu().numpy()
            for name, pred in (("dnn", pred_dnn), ("average", average(probs)), ("vote", vote(probs))):
                results["methods"].setdefault(name, {})[s] = accuracy(pred, y)
            for i in range(ctx.n):
                if len(results["local"]) <= i:
                    results["local"].append({"subdomain": i})
                results["local"][i][s] = accuracy(probs[:, i].argmax(1), y)
        info["wall_seconds"] = time.perf_counter() - t0
        results["dnn"] = info
        checkpoint.save({"model": dnn.state_dict(), "input": kind, "hidden": list(ctx.cfg.dnn.hidden),
                         "info": info}, ctx.path("aggregate", "dnn.pt"))
        checkpoint.write_json(results, ctx.path("aggregate", "result.json"))
        if os.path.exists(ctx.path("aggregate", "dnn.ckpt.pt")):
            os.unlink(ctx.path("aggregate", "dnn.ckpt.pt"))
        m = results["methods"]
        ctx.log(f"[aggregate] test accuracy: dnn {m['dnn']['test']:.4f}, average {m['average']['test']:.4f}, "
                f"vote {m['vote']['test']:.4f}; local CNNs "
                f"{min(r['test'] for r in results['local']):.4f}..{max(r['test'] for r in results['local']):.4f}")
    ctx.sync()
    ctx.mark_done("aggregate")


# ---------------------------------------------------------------------------------- coherent
def coherent_accuracy(ctx: Context, model: DistributedCoherent, split: str) -> float:
    """Accuracy of the coherent model on a split: outputs gathered at rank 0, the DNN there."""
    n = ctx.manifest["splits"][split]
    full = gather_at_root(ctx, split, lambda: model.local_outputs(
        {i: ctx.data(i, split) for i in ctx.world.own.subdomains}, np.arange(n), ctx.device, ctx.cfg.eval_batch_size))
    acc = None
    if ctx.world.is_root:
        z = torch.from_numpy(full).to(ctx.device)
        model.dnn.eval()
        with torch.no_grad():
            pred = model.dnn(z).argmax(1).cpu().numpy()
        model.dnn.train()
        acc = accuracy(pred, labels_of(ctx, split).numpy())
    return float(ctx.world.bcast_obj(acc))


def _coherent_states(model: DistributedCoherent) -> dict:
    return {"local": {i: {k: v.detach().clone() for k, v in m.state_dict().items()}
                      for i, m in model.local_models.items()},
            "dnn": {k: v.detach().clone() for k, v in model.dnn.state_dict().items()}}


def _load_coherent_states(model: DistributedCoherent, states: dict) -> None:
    for i, m in model.local_models.items():
        m.load_state_dict(states["local"][i])
    model.dnn.load_state_dict(states["dnn"])


def build_coherent(ctx: Context, strategy: str) -> DistributedCoherent:
    """scratch: the local-phase and DNN initialisations; transfer: the trained local CNNs and DNN."""
    if strategy == "transfer":
        models = load_local_models(ctx, ctx.path("local"))
        dnn = ctx.dnn()
        saved = checkpoint.load(ctx.path("aggregate", "dnn.pt"))
        dnn.load_state_dict(saved["model"])
    else:
        models = {i: ctx.local_model(i) for i in ctx.world.own.subdomains}
        dnn = ctx.dnn()
    return DistributedCoherent(ctx.world, models, dnn, ctx.n, ctx.cfg.dnn.input)


def train_coherent(ctx: Context, strategy: str, t: TrainConfig) -> None:
    """Model-parallel training of the whole CNN-DNN; checkpoint per epoch (and at a preemption step)."""
    from .preemption import Preempted

    own, world = ctx.world.own, ctx.world
    out = ctx.path("coherent", strategy)
    os.makedirs(out, exist_ok=True)
    model = build_coherent(ctx, strategy)
    opt = make_optimizer(list(model.parameters()), t)
    sched = make_scheduler(opt, t)
    ckpt = os.path.join(out, f"rank_{world.rank:04d}.ckpt.pt")
    start, first_step, partial = 0, 0, None
    best_val, best_epoch, history, seconds = -1.0, 0, [], 0.0
    best = _coherent_states(model)
    if os.path.exists(ckpt):
        s = restore_training(ckpt, opt, sched, ctx.device)
        _load_coherent_states(model, s["current"])
        start, first_step, partial = s["epoch"], s["step"], s["partial"]
        best_val, best_epoch, history, seconds = s["best_val"], s["best_epoch"], s["history"], s["seconds"]
        best, initial_val = s["best"], s["initial_val"]
    else:  # the starting point is a candidate too: transfer never ends below where it began
        initial_val = best_val = coherent_accuracy(ctx, model, "val")

    def save(epoch: int, step: int, partial_state) -> None:
        checkpoint.save(training_state(opt, sched, current=_coherent_states(model), epoch=epoch, step=step,
                                       partial=partial_state, best=best, best_val=best_val, best_epoch=best_epoch,
                                       history=history, seconds=seconds, initial_val=initial_val), ckpt)

    train = {i: ctx.data(i, "train") for i in own.subdomains}
    n = ctx.manifest["splits"]["train"]
    first = own.subdomains[0]
    dims = len(ctx.manifest["image_shape"]) - 1
    key = 0 if strategy == "scratch" else 1
    stop = ctx.stop_collective()
    for epoch in range(start, t.epochs):
        model.train()
        model.comm_time = 0.0
        losses, done_seconds, step0 = [], 0.0, 0
        if partial is not None and epoch == start:
            losses, done_seconds, step0 = list(partial["losses"]), partial["seconds"], first_step
            model.comm_time = partial["comm_seconds"]
        t0 = time.perf_counter()
        shifts = epoch_shifts(ctx.cfg.seed + key, epoch, train[first].ids, t.augment_shift, dims)
        batches = epoch_batches(ctx.cfg.seed + key, epoch, n, t.batch_size)
        for step in range(step0, len(batches)):
            if stop is not None and stop():
                save(epoch, step, {"losses": losses, "seconds": done_seconds + time.perf_counter() - t0,
                                   "comm_seconds": model.comm_time})
                raise Preempted()
            rows = batches[step]
            part = rows[slice_rows(len(rows), own.replicas, own.replica)]
            xs = {}
            for i in own.subdomains:
                x, _ = train[i].batch(part, None if shifts is None else shifts[part])
                xs[i] = x.to(ctx.device, non_blocking=True)
            y = train[first].y[torch.from_numpy(rows)].to(ctx.device)
            losses.append(model.step(xs, y, len(rows), opt, (ctx.cfg.seed, key, epoch, step)))
        sched.step()
        if own.replicas > 1:
            allreduce_mean_([b for m in model.local_models.values() for b in buffers_of(m)], world.group, own.replicas)
        elapsed = done_seconds + time.perf_counter() - t0
        seconds += elapsed
        val = coherent_accuracy(ctx, model, "val")
        event = {"epoch": epoch + 1, "epochs": t.epochs, "loss": float(np.mean(losses)), "val_acc": val,
                 "seconds": elapsed, "comm_seconds": model.comm_time, "images_per_s": n / max(elapsed, 1e-9)}
        history.append(event)
        if val > best_val:
            best_val, best_epoch, best = val, epoch + 1, _coherent_states(model)
        save(epoch + 1, 0, None)
        ctx.event(phase="coherent", strategy=strategy, **event)
        ctx.log(f"[coherent {strategy}] epoch {epoch + 1}/{t.epochs}: loss {event['loss']:.4f} val {val:.4f} "
                f"({elapsed:.1f} s, communication {model.comm_time:.1f} s)")
    _load_coherent_states(model, best)
    test = coherent_accuracy(ctx, model, "test")
    if own.replica == 0:
        for i, m in model.local_models.items():
            checkpoint.save({"model": m.state_dict(), "subdomain": i}, os.path.join(out, f"sub_{i:03d}.pt"))
    if world.is_root:
        checkpoint.save({"model": model.dnn.state_dict(), "input": ctx.cfg.dnn.input,
                         "hidden": list(ctx.cfg.dnn.hidden)}, os.path.join(out, "dnn.pt"))
        comm = sum(e["comm_seconds"] for e in history)
        checkpoint.write_json({"strategy": strategy, "val": best_val, "test": test, "best_epoch": best_epoch,
                               "initial_val": initial_val, "train_seconds": seconds, "comm_seconds": comm,
                               "epochs": t.epochs, "history": history}, os.path.join(out, "result.json"))
        ctx.log(f"[coherent {strategy}] best val {best_val:.4f} (epoch {best_epoch}), test {test:.4f}")
    ctx.sync()
    if os.path.exists(ckpt):
        os.unlink(ckpt)


def phase_coherent(ctx: Context) -> None:
    for strategy in ctx.cfg.coherent.strategies:
        key = f"coherent_{strategy}"
        if ctx.done(key):
            continue
        t0 = time.perf_counter()
        train_coherent(ctx, strategy, getattr(ctx.cfg.coherent, strategy))
        ctx.mark_done(key, wall_seconds=time.perf_counter() - t0)
    ctx.mark_done("coherent")


# ------------------------------------------------------------------------------------ global
def phase_global(ctx: Context) -> None:
    """The global CNN on full images, data-parallel over all ranks (Allreduce of gradients)."""
    world = ctx.world
    os.makedirs(ctx.path("global"), exist_ok=True)
    t0 = time.perf_counter()
    model = ctx.global_model()
    result = fit(model, Fit(
        train=ctx.data(None, "train"), val=ctx.data(None, "val"), t=ctx.cfg.global_, seed=ctx.cfg.seed,
        key=(TAG_GLOBAL,), device=ctx.device, eval_batch=ctx.cfg.eval_batch_size,
        comm=world.comm if world.size > 1 else None, ckpt_path=ctx.path("global", "model.ckpt.pt"),
        writer=world.is_root, on_epoch=_epoch_logger(ctx, "global", "global CNN"), stop=ctx.stop_collective()))
    model.load_state_dict(result.best_state)
    test = accuracy_of(model, ctx.data(None, "test"), ctx.device, ctx.cfg.eval_batch_size,
                       world.comm if world.size > 1 else None, world.size, world.rank)
    if world.is_root:
        for e in result.history:
            ctx.event(phase="global", **e)
        checkpoint.save({"model": result.best_state}, ctx.path("global", "model.pt"))
        checkpoint.write_json({"val": result.best_val, "test": test, "best_epoch": result.best_epoch,
                               "parameters": count_parameters(model), "train_seconds": result.train_seconds,
                               "wall_seconds": time.perf_counter() - t0, "epochs": ctx.cfg.global_.epochs,
                               "history": result.history}, ctx.path("global", "result.json"))
        ctx.log(f"[global] best val {result.best_val:.4f} (epoch {result.best_epoch}), test {test:.4f}")
    ctx.sync()
    ckpt = ctx.path("global", "model.ckpt.pt")
    if world.is_root and os.path.exists(ckpt):
        os.unlink(ckpt)
    ctx.release(None)
    ctx.mark_done("global")


def phase_report(ctx: Context) -> None:
    from .report import write_report

    if ctx.world.is_root:
        write_report(ctx)
    ctx.world.barrier()
    ctx.mark_done("report")


PHASE_FUNCTIONS = {"local": phase_local, "aggregate": phase_aggregate, "coherent": phase_coherent,
                   "global": phase_global, "report": phase_report}
