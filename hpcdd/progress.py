"""What a user sees while a run trains: a live bar on a terminal, a periodic line in batch logs.

Every rank keeps cheap counters of its current training (phase, training, epoch, step, images,
seconds) and writes them to RUN/progress/rank_RRRR.json every few seconds (atomic, no MPI, never
blocking). Rank 0 prints: on a terminal a tqdm bar per epoch (tqdm is optional), in a batch log a
line every ``log_interval`` seconds with every rank's training, images/s and the ETA of the phase
and of the whole run. The run ETA extrapolates the measured rate (forward FLOPs per second) to the
work the remaining phases hold (their epochs x samples x forward FLOPs of their models).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field

from . import atomic, extras
from .errors import UserError
from .parallel.watchdog import alive
from .registry import REGISTRY, Work


def forward_flops(model, shape) -> float:
    """Forward FLOPs of one sample of ``shape`` (C, *spatial), counted by torch's FLOP counter."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    param = next(model.parameters())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros((1,) + tuple(shape), device=param.device, dtype=param.dtype))
    model.train(was)
    return float(counter.get_total_flops())


def training_flops(model, shape) -> float:
    """Forward + backward FLOPs of one training sample of ``shape`` (counted on a batch of two, so
    BatchNorm behaves as in training)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.train()
    param = next(model.parameters())
    x = torch.zeros((2,) + tuple(shape), device=param.device, dtype=param.dtype)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    model.train(was)
    return float(counter.get_total_flops()) / 2


def duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


@dataclass
class Plan:
    """Forward FLOPs of the work left in the run, per phase; measured rates turn it into time."""

    flops: dict = field(default_factory=dict)  # phase -> work (FLOPs) of the busiest rank

    def remaining_after(self, phase: str, order) -> float:
        later = list(order)[list(order).index(phase) + 1:] if phase in order else list(order)
        return sum(self.flops.get(p, 0.0) for p in later)


def make_plan(cfg, manifest, models, own_table, ranks: int) -> Plan:
    """Each phase's cost as the registry computes it from the models' forward FLOPs."""
    local = [forward_flops(models.local(i), (manifest.channels,) + manifest.subimage_shape(i)) for i in range(manifest.n)]
    per_rank = [sum(local[i] for i in subs) for subs in own_table]
    g = forward_flops(models.global_(), manifest.stored_shape(None)[:1] + manifest.spatial) / ranks \
        if manifest.full else None
    work = Work(manifest.count("train"), manifest.count("val"), sum(manifest.splits.values()), max(per_rank), g)
    plan = Plan()
    for phase in REGISTRY:
        cost = phase.cost(cfg, work)
        if cost is not None:
            plan.flops[phase.name] = cost
    return plan


_COUNTERS = ("epoch", "epochs", "step", "steps", "images", "left", "done_steps")


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _seconds(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0


def _tqdm():
    from tqdm import tqdm

    return tqdm


class Progress:
    """One rank's counters; rank 0 also prints."""

    def __init__(self, layout, world, phases, plan: Plan | None = None, interval: float = 30.0,
                 write_every: float = 2.0, terminal: bool | None = None):
        self.layout, self.world, self.phases, self.plan = layout, world, list(phases), plan
        self.interval, self.write_every = interval, write_every
        self.terminal = sys.stdout.isatty() if terminal is None else terminal
        self.current: dict = {}
        self.phase, self.phase_started = None, time.perf_counter()
        self.last_write = self.last_print = time.perf_counter()
        self.bar = None
        self.ignored: set[str] = set()

    # ------------------------------------------------------------------ every rank
    def start_phase(self, phase: str) -> None:
        alive()
        self.phase, self.phase_started = phase, time.perf_counter()
        self.last_print = time.perf_counter()

    def start_training(self, label: str, epochs: int, trainings_left: int = 0, flops_per_image: float = 0.0) -> None:
        """``trainings_left``: further trainings of this rank in this phase, each like this one."""
        self.current = {"rank": self.world.rank, "phase": self.phase, "label": label, "epoch": 0, "epochs": epochs,
                        "step": 0, "steps": 0, "images": 0, "seconds": 0.0, "left": trainings_left,
                        "done_steps": 0, "flops_per_image": flops_per_image}
        self._t0 = time.perf_counter()

    def step(self, epoch: int, step: int, steps: int, rows: int) -> None:
        alive()
        c = self.current
        if not c:
            return
        now = time.perf_counter()
        c.update(epoch=epoch, step=step + 1, steps=steps, images=c["images"] + rows, seconds=now - self._t0)
        c["done_steps"] += 1
        if c["done_steps"] == 1:  # includes warm-up: left out of both rates
            c["first_step_seconds"], c["first_step_images"] = c["seconds"], c["images"]
        if (c["done_steps"] == 1 or now - self.last_write >= self.write_every) and not self.world.is_root:
            self._write()
        if self.world.is_root:
            self._show(now)

    def end_training(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.current = {}

    def _write(self) -> None:
        """Best effort: a progress line is not worth ending a run over (a full disk shows at the next checkpoint)."""
        self.last_write = time.perf_counter()
        try:
            atomic.write_json(self.current, os.path.join(self.layout.progress, f"rank_{self.world.rank:04d}.json"))
        except (OSError, UserError):
            pass

    # ------------------------------------------------------------------ rank 0
    def _others(self) -> list[dict]:
        """The other ranks' records of this phase. The files are advisory: one that is not a record this
        run's ranks write (another tool's file, a hand edit) is skipped with one warning, never fatal."""
        out = []
        directory = self.layout.progress
        for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
            if not (name.startswith("rank_") and name.endswith(".json")):
                continue
            try:
                with open(os.path.join(directory, name)) as f:
                    d = json.load(f)
            except OSError:
                continue
            except ValueError:  # a torn write cannot happen (atomic), but a foreign file can
                d = None
            problem = self._problem(d)
            if problem:
                if name not in self.ignored:
                    self.ignored.add(name)
                    print(f"warning: {os.path.join(directory, name)}: {problem}; ignored (progress files are "
                          f"advisory)", file=sys.stderr, flush=True)
                continue
            if d["phase"] == self.phase and d["rank"] != self.world.rank:
                out.append(d)
        return out

    def _problem(self, d) -> str | None:
        """Why ``d`` is not a progress record of one of this run's ranks (None: it is one)."""
        if not isinstance(d, dict):
            return "not a JSON object"
        if not (_count(d.get("rank")) and d["rank"] < self.world.size):
            return f"rank {d.get('rank')!r} is not one of this run's {self.world.size} ranks"
        if not (isinstance(d.get("phase"), str) and isinstance(d.get("label"), str)):
            return "phase and label are not strings"
        times = ("seconds", "first_step_seconds") if _count(d.get("done_steps")) and d["done_steps"] else ("seconds",)
        bad = [k for k in _COUNTERS if not _count(d.get(k))] + [k for k in times if not _seconds(d.get(k))]
        return f"{', '.join(bad)}: expected non-negative numbers" if bad else None

    @staticmethod
    def _eta(c: dict) -> float | None:
        """Seconds this rank still needs in this phase, from its own rate."""
        if c.get("done_steps", 0) < 3 or not c.get("steps"):
            return None
        per_step = (c["seconds"] - c["first_step_seconds"]) / (c["done_steps"] - 1)
        left = (c["epochs"] - c["epoch"]) * c["steps"] - c["step"] + c.get("left", 0) * c["epochs"] * c["steps"]
        return max(0.0, left * per_step)

    def _show(self, now: float) -> None:
        c = self.current
        if self.terminal:
            self._bar(c)
            return
        if self.interval <= 0 or now - self.last_print < self.interval:
            return
        everyone = [c] + (self._others() if self.phase == "local" else [])
        etas = [e for e in (self._eta(d) for d in everyone) if e is not None]
        phase_eta = max(etas) if etas else None
        if phase_eta is not None:  # a line without an ETA yet (a training's first steps) is not the periodic one:
            self.last_print = now  # the next step prints again, so a short training still shows its ETA
        rate = c["images"] / max(c["seconds"], 1e-9)
        parts = [f"{d['label']} epoch {d['epoch'] + 1}/{d['epochs']} step {d['step']}/{d['steps']}"
                 + (f" (rank {d['rank']})" if d["rank"] != self.world.rank else "") for d in everyone]
        line = f"[{self.phase}] {'; '.join(parts)}; {rate:.0f} img/s"
        if phase_eta is not None:
            line += f"; phase ETA {duration(phase_eta)}"
            run_eta = self.run_eta(phase_eta)
            if run_eta is not None:
                line += f", run ETA ~{duration(run_eta)}"
        print(line, flush=True)

    def run_eta(self, phase_eta: float) -> float | None:
        """The phase's ETA plus the remaining phases' work at the FLOP rate measured now, after the
        training's first step (its warm-up: counted in, the rate at a training's third step was a
        sixth of the steady one, and the run ETA read 57 minutes in a 14-minute run)."""
        c = self.current
        seconds = c.get("seconds", 0.0) - c.get("first_step_seconds", 0.0)
        if self.plan is None or not c.get("flops_per_image") or seconds <= 0:
            return None
        rate = 3 * (c["images"] - c.get("first_step_images", 0)) * c["flops_per_image"] / seconds
        return phase_eta + self.plan.remaining_after(self.phase, self.phases) / rate

    def _bar(self, c: dict) -> None:
        tqdm = extras.load("tqdm", _tqdm)
        if tqdm is None:
            return
        if self.bar is None or self.bar.desc != f"[{self.phase}] {c['label']} epoch {c['epoch'] + 1}/{c['epochs']}":
            if self.bar is not None:
                self.bar.close()
            self.bar = tqdm(total=c["steps"], desc=f"[{self.phase}] {c['label']} epoch {c['epoch'] + 1}/{c['epochs']}",
                            unit="step", leave=False, dynamic_ncols=True)
        self.bar.n = c["step"]
        eta = self._eta(c)
        self.bar.set_postfix_str(f"{c['images'] / max(c['seconds'], 1e-9):.0f} img/s"
                                 + (f", phase ETA {duration(eta)}" if eta is not None else ""), refresh=True)
