"""What a phase is handed: configuration, world, manifest, run layout, models, data, run state, logging.

Each part is its own object; ``RunContext`` bundles them and adds what more than one phase does
the same way: the stop polls, the logging, which local CNNs a rank runs fused (``fused_groups``,
``local_groups``), gathering every subdomain's outputs at rank 0 (``gather_at_root``) and the labels.
Phases import this module and nothing of each other (tests/test_imports.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import atomic
from ..config import Config
from ..events import EventLog
from ..factory import DataCache, Models
from ..fused import load_state_dicts, shape_groups
from ..layout import RunLayout
from ..manifest import Manifest
from ..parallel.collectives import gather_outputs
from ..parallel.preemption import Preempted
from ..parallel.world import World
from ..progress import forward_flops
from ..training.acceleration import wants_compile


@dataclass
class RunState:
    """RUN/state.json: which phases are complete, and whether the run was stopped (rank 0 writes it)."""

    path: str
    values: dict = field(default_factory=lambda: {"phases": {}})

    @classmethod
    def read(cls, path: str) -> "RunState":
        return cls(path, atomic.read_json(path))

    def done(self, phase: str) -> bool:
        return bool(self.values.get("phases", {}).get(phase, {}).get("done"))

    def completed(self) -> set[str]:
        return {p for p, v in self.values.get("phases", {}).items() if v.get("done")}

    def mark_done(self, phase: str, write: bool, **info) -> None:
        self.values.setdefault("phases", {})[phase] = dict(done=True, **info)
        if write:
            atomic.write_json(self.values, self.path)

    def mark_preempted(self, phase: str, when: str, write: bool) -> None:
        self.values["preempted"] = {"phase": phase, "time": when}
        if write:
            atomic.write_json(self.values, self.path)

    def clear_preempted(self) -> None:
        self.values.pop("preempted", None)


@dataclass
class RunContext:
    cfg: Config
    world: World
    layout: RunLayout
    manifest: Manifest
    state: RunState
    stop: object = None  # preemption.StopFlag
    models: Models = None
    data: DataCache = None
    events: EventLog = None
    progress: object = None  # hpcdd.progress.Progress
    watchdog: object = None  # hpcdd.parallel.watchdog.Watchdog

    def __post_init__(self):
        if self.events is None:
            self.events = EventLog(self.layout, self.world.is_root, self.cfg.tensorboard)
        if self.models is None:
            self.models = Models(self.cfg.model, self.cfg.dnn, self.manifest, self.cfg.seed, self.world.device,
                                 self.cfg.performance)
        if self.data is None:
            self.data = DataCache(self.manifest, self.cfg.memory_limit_gb, self.world.device, self.cfg.data_on_device)

    def fused_groups(self, subdomains: list) -> list:
        """``subdomains`` as groups that run as one fused model (``fused.shape_groups``, by
        ``performance.fuse_local``), or one by one."""
        return shape_groups(self.models, subdomains, self.cfg.performance.fuse_local, self.device,
                            self.world.own.replicas)

    def local_groups(self, path_of=None) -> dict:
        """This rank's local CNNs, keyed by the tuple of subdomains each module computes (fused where
        ``fused_groups`` says so), with the weights in ``path_of(i)`` (None: as initialised)."""
        groups = {}
        for group in self.fused_groups(self.world.own.subdomains):
            model = self.models.group(group)
            if path_of is not None:
                load_state_dicts(model, [atomic.load(path_of(i))["model"] for i in group])
            groups[tuple(group)] = model
        return groups

    def gather_at_root(self, split: str, compute):
        """(n, N, K) outputs of every subdomain on a split, at rank 0 (None elsewhere): ``compute()``
        gives this rank's (n_owned, n, K) block; only the first replica of a subdomain computes it."""
        n = self.manifest.count(split)
        mine = compute() if self.world.own.replica == 0 else np.zeros((0, n, self.manifest.k), np.float32)
        return gather_outputs(self.world.comm, mine)

    def labels(self, split: str):
        """The labels of a split (every shard holds them, in the same order)."""
        return self.data(self.world.own.subdomains[0], split).y

    @property
    def device(self):
        return self.world.device

    def sync(self) -> None:
        """The end of a phase's parallel work: every rank meets here, then all agree whether to stop."""
        self.world.idle_barrier()
        if self.stop is not None and self.stop.agree():
            raise Preempted(synced=True)

    def stop_independent(self):
        """The local phase's stop poll (ranks not in lockstep; replicas agree in their group)."""
        if self.stop is None:
            return None
        return lambda: self.stop.poll_independent(self.world.replicas)

    def stop_alone(self):
        """The stop poll of work one rank does while the others wait (the DNN on rank 0)."""
        if self.stop is None:
            return None
        return lambda: self.stop.poll_independent()

    def stop_collective(self):
        return None if self.stop is None else self.stop.poll_collective

    def mark_done(self, phase: str, **info) -> None:
        self.state.mark_done(phase, self.world.is_root, **info)

    def log(self, message: str) -> None:
        if self.world.is_root:
            print(message, flush=True)

    def event(self, **fields) -> None:
        """One JSON line in RUN/metrics.jsonl (and TensorBoard scalars), rank 0 only: one owner per file."""
        self.events(**fields)

    def training(self, label: str, epochs: int, models: dict, left: int = 0, share: float = 1.0):
        """Progress of a training starts; returns the engine's ``on_step``. ``models`` (index -> model;
        index None: the global CNN) give rank 0 the forward FLOPs per sample (times ``share``, this
        rank's part of a minibatch) from which it extrapolates the run's ETA."""
        flops = 0.0
        if self.world.is_root and self.progress.plan is not None:
            m = self.manifest
            flops = share * sum(forward_flops(model, (m.channels,) + m.subimage_shape(i)) for i, model in models.items())
        self.progress.start_training(label, epochs, left, flops)
        return self.progress.step

    def first_step_note(self) -> str:
        """What a training's first step holds besides the step, for the log."""
        return " (includes torch.compile's compilation)" if wants_compile(self.cfg.performance.compile, self.device)[0] \
            else ""

    def epoch_logger(self, phase: str, label: str):
        def on_epoch(event):
            self.log(f"[{phase}] {label} epoch {event['epoch']}/{event['epochs']}: loss {event['loss']:.4f} "
                     f"train {event['train_acc']:.4f} val {event['val_acc']:.4f} "
                     f"({event['seconds']:.1f} s, {event['images_per_s']:.0f} img/s)")
        return on_epoch

    def resume_logger(self, phase: str, write_event: bool = True, **ids):
        """Record where a training resumed from (the training state, metrics.jsonl and the log), so a
        resume can be told from a recompute. ``write_event`` False: the phase writes the event itself
        (the local phase, whose trainings run on every rank)."""
        def on_resume(state):
            point = {"epoch": state.epoch, "step": state.step}
            state.extra.setdefault("resumes", []).append(point)
            if write_event:
                self.event(event="resume", phase=phase, **ids, **point)
            what = " ".join(f"{k} {v}" for k, v in ids.items())
            print(f"[{phase}] rank {self.world.rank}: resumed {what + ' ' if what else ''}at epoch "
                  f"{state.epoch}, step {state.step}", flush=True)
        return on_resume
