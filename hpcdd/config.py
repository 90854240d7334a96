"""The run configuration: dataclasses merged from a TOML file and command-line overrides.

Every value is validated before any training; unknown keys get the closest known key as a hint.
The resolved configuration is written once to ``RUN/config.json``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tomllib
import typing
from dataclasses import dataclass, field

from .atomic import read_json
from .augmentation import NAMES
from .errors import UserError
from .layout import RunLayout
from .parallel.preemption import parse_signals
from .registry import PHASES

FAMILIES = ("vgg", "resnet20", "resnet32", "resnet18")
STRATEGIES = ("scratch", "transfer")


@dataclass
class ModelConfig:
    """The CNN family and its global widths; local CNNs scale the widths (``build_model``)."""

    family: str = "vgg"
    widths: list[int] = field(default_factory=lambda: [32, 64, 128])
    convs_per_block: int = 2
    hidden: int = 128
    dropout: float = 0.2
    local_width_scale: float = 0.0  # 0 means 1/sqrt(N)


@dataclass
class OptimConfig:
    """What every trained model has: epochs, minibatch, optimizer and per-epoch schedule."""

    epochs: int = 5
    batch_size: int = 128
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    step_size: int = 10
    gamma: float = 0.1


@dataclass
class TrainConfig(OptimConfig):
    """A CNN training (local, global, coherent strategies)."""

    augment_shift: int = 0  # pixels the whole image moves (needs shards prepared with --margin >= it)
    augment_flip: bool = False  # left-right flip of the whole image (a mirror-symmetric grid)


@dataclass
class DNNConfig(OptimConfig):
    """The dense aggregator, trained by the same engine as the CNNs."""

    epochs: int = 40
    lr: float = 3e-3
    weight_decay: float = 1e-4
    hidden: list[int] = field(default_factory=lambda: [64])
    dropout: float = 0.1
    input: str = "probs"


@dataclass
class CoherentConfig:
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
    scratch: TrainConfig = field(default_factory=TrainConfig)
    transfer: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=3, lr=2e-4))


@dataclass
class PreemptionConfig:
    signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    requeue: bool = False  # under SLURM: `scontrol requeue` the job after checkpointing


@dataclass
class PerformanceConfig:
    """How the CNNs run (hpcdd/training/acceleration.py): "auto" (measured best here), "on" or "off"."""

    channels_last: str = "auto"  # auto: on for 2D CNNs
    compile: str = "auto"  # auto: on a GPU; on the CPU off (compile time exceeds the gain in short runs)
    fused_optimizer: str = "auto"  # auto: torch's fused Adam/AdamW/SGD kernels where the device has them
    flush_denormal: str = "auto"  # auto: on the CPU, subnormal floats are flushed to zero
    autocast: str = "off"  # "bf16": the CNNs' forward in bfloat16 mixed precision (GPUs with bf16; slow on most CPUs)
    fuse_local: str = "auto"  # auto: on the CPU, narrow local CNNs of one subimage shape on a rank train as one model


@dataclass
class Config:
    data: str = ""
    out: str = ""
    phases: list[str] = field(default_factory=lambda: list(PHASES))
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # 0: cores on the node / ranks on the node
    memory_limit_gb: float = 4.0  # a split larger than this (as float32) is streamed from its shard
    data_on_device: bool = True  # on a GPU, keep in-memory splits in GPU memory
    eval_batch_size: int = 512
    num_classes: int = 0  # 0: from the data; otherwise checked against it
    log_interval: float = 30.0  # seconds between progress lines in batch logs (0: none); a terminal gets a bar
    tensorboard: bool = True  # event files under RUN/tensorboard when the tensorboard package is installed
    watchdog_timeout: float = 1800.0  # seconds without progress on any rank before the job is ended (0: never)
    model: ModelConfig = field(default_factory=ModelConfig)
    local: TrainConfig = field(default_factory=TrainConfig)
    dnn: DNNConfig = field(default_factory=DNNConfig)
    coherent: CoherentConfig = field(default_factory=CoherentConfig)
    global_: TrainConfig = field(default_factory=TrainConfig)
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)

    def to_dict(self) -> dict:
        return _to_dict(self)


def _key(f: dataclasses.Field) -> str:
    return f.name.rstrip("_")


def _to_dict(obj) -> dict:
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        out[_key(f)] = _to_dict(v) if dataclasses.is_dataclass(v) else (list(v) if isinstance(v, (list, tuple)) else v)
    return out


def all_keys(cls=Config, prefix: str = "") -> dict[str, type]:
    """Dotted key -> type for every leaf field."""
    hints = typing.get_type_hints(cls)
    keys = {}
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        name = prefix + _key(f)
        if dataclasses.is_dataclass(t):
            keys.update(all_keys(t, name + "."))
        else:
            keys[name] = t
    return keys


def _suggest(key: str) -> str:
    tail = key.split(".")[-1]
    if tail.startswith("augment"):
        trainings = [k.rsplit(".", 1)[0] for k in all_keys() if k.endswith("." + NAMES[0])]
        return f"; the augmentations are {', '.join(NAMES)}, of {', '.join(trainings)}"
    close = difflib.get_close_matches(key, list(all_keys()), n=1, cutoff=0.5)
    if not close:
        tail = key.split(".")[-1]
        close = [k for k in all_keys() if k.split(".")[-1] == tail][:1]
    return f"; did you mean {close[0]!r}?" if close else ""


def _coerce(key: str, value, t, where: str):
    """Convert a TOML value or a command-line string to the field's type, or raise a UserError."""
    origin = typing.get_origin(t)
    try:
        if origin is list:
            (inner,) = typing.get_args(t)
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise TypeError
            return [_coerce(key, v, inner, where) for v in value]
        if t is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
                return value.lower() in ("true", "1", "yes")
            raise TypeError
        if t is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if t is float:
            if isinstance(value, bool) or not math.isfinite(float(value)):
                raise TypeError
            return float(value)
        if t is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise TypeError
            return str(value)
    except (TypeError, ValueError):
        pass
    name = {"float": "a finite number", "int": "an integer"}.get(getattr(t, "__name__", ""), getattr(t, "__name__", str(t)))
    if origin is list:
        name = "a list of " + typing.get_args(t)[0].__name__
    raise UserError(f"{where}: {key} = {value!r}: expected {name}")


def _set(cfg: Config, key: str, value, where: str) -> None:
    keys = all_keys()
    if key not in keys:
        raise UserError(f"{where}: unknown config key {key!r}{_suggest(key)}")
    value = _coerce(key, value, keys[key], where)
    obj = cfg
    parts = key.split(".")
    for p in parts[:-1]:
        obj = getattr(obj, p if hasattr(obj, p) else p + "_")
    leaf = parts[-1] if hasattr(obj, parts[-1]) else parts[-1] + "_"
    setattr(obj, leaf, value)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_toml(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"--config {path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"--config {path}: invalid TOML ({e})") from None
    except UnicodeDecodeError:
        raise UserError(f"--config {path}: not a text file") from None


def build_config(file_values: dict | None, overrides: dict[str, object], file_name: str = "config",
                 shorthands: dict[str, object] | None = None) -> Config:
    """Defaults, then the file, then the command line's shorthands (``--epochs``), then its keys
    (``--set``, ``--seed`` ...): a specific key always wins over a shorthand, whatever the order of
    the flags. Then validation."""
    cfg = Config()
    for key, value in _flatten(file_values or {}).items():
        _set(cfg, key, value, file_name)
    for key, value in (shorthands or {}).items():
        _set(cfg, key, value, "command line")
    for key, value in overrides.items():
        _set(cfg, key, value, "command line")
    validate(cfg)
    return cfg


def config_of_run(run_dir: str, overrides: dict | None = None, what: str | None = None) -> Config:
    """The configuration a run was made with (RUN/config.json without its meta block), ``out`` set to
    where the run is now: what --resume, the report and the benchmarks rebuild a run from."""
    path = RunLayout(run_dir).config
    if not os.path.isfile(path):
        raise UserError(f"{what or run_dir}: no {path}; is it a directory hpcdd-run wrote?")
    saved = read_json(path)
    saved.pop("meta", None)
    return build_config(saved, dict(overrides or {}, out=run_dir), path)


def _train_checks(prefix: str, t: OptimConfig) -> list[tuple[bool, str]]:
    checks = [
        (t.epochs >= 1, f"{prefix}.epochs = {t.epochs}: expected a positive number of epochs"),
        (t.batch_size >= 1, f"{prefix}.batch_size = {t.batch_size}: expected a positive batch size"),
        (t.optimizer in ("sgd", "adam", "adamw"), f"{prefix}.optimizer = {t.optimizer!r}: expected sgd, adam or adamw"),
        (t.lr > 0, f"{prefix}.lr = {t.lr}: expected a positive learning rate"),
        (0 <= t.momentum < 1, f"{prefix}.momentum = {t.momentum}: expected 0 <= momentum < 1"),
        (t.weight_decay >= 0, f"{prefix}.weight_decay = {t.weight_decay}: expected a non-negative number"),
        (t.schedule in ("constant", "cosine", "step"), f"{prefix}.schedule = {t.schedule!r}: expected constant, cosine or step"),
        (t.step_size >= 1, f"{prefix}.step_size = {t.step_size}: expected a positive number of epochs"),
        (0 < t.gamma <= 1, f"{prefix}.gamma = {t.gamma}: expected 0 < gamma <= 1"),
    ]
    if isinstance(t, TrainConfig):
        checks.append((t.augment_shift >= 0, f"{prefix}.augment_shift = {t.augment_shift}: expected 0 or more pixels"))
    return checks


def validate(cfg: Config) -> None:
    m, d = cfg.model, cfg.dnn
    checks = [
        (bool(cfg.phases), "phases: expected at least one of " + ", ".join(PHASES)),
        (cfg.device in ("auto", "cpu", "cuda"), f"device = {cfg.device!r}: expected auto, cpu or cuda"),
        (cfg.threads >= 0, f"threads = {cfg.threads}: expected 0 (automatic) or a positive count"),
        (cfg.memory_limit_gb > 0, f"memory_limit_gb = {cfg.memory_limit_gb}: expected a positive size"),
        *((getattr(cfg.performance, k) in ("auto", "on", "off"),
           f"performance.{k} = {getattr(cfg.performance, k)!r}: expected \"auto\", \"on\" or \"off\"")
          for k in ("channels_last", "compile", "fused_optimizer", "flush_denormal", "fuse_local")),
        (cfg.performance.autocast in ("off", "bf16"),
         f"performance.autocast = {cfg.performance.autocast!r}: expected \"off\" or \"bf16\""),
        (cfg.num_classes >= 0, f"num_classes = {cfg.num_classes}: expected 0 (from the data) or a class count"),
        (cfg.log_interval >= 0, f"log_interval = {cfg.log_interval}: expected 0 (off) or a number of seconds"),
        (cfg.watchdog_timeout >= 0, f"watchdog_timeout = {cfg.watchdog_timeout}: expected 0 (off) or a number of seconds"),
        (cfg.eval_batch_size >= 1, f"eval_batch_size = {cfg.eval_batch_size}: expected a positive batch size"),
        (m.family in FAMILIES, f"model.family = {m.family!r}: expected one of {', '.join(FAMILIES)}"),
        (bool(m.widths) and all(w >= 1 for w in m.widths), f"model.widths = {m.widths}: expected positive widths"),
        (m.convs_per_block >= 1, f"model.convs_per_block = {m.convs_per_block}: expected at least 1"),
        (m.hidden >= 1, f"model.hidden = {m.hidden}: expected a positive width"),
        (0 <= m.dropout < 1, f"model.dropout = {m.dropout}: expected 0 <= dropout < 1"),
        (m.local_width_scale >= 0, f"model.local_width_scale = {m.local_width_scale}: expected 0 (auto) or a positive scale"),
        (all(h >= 1 for h in d.hidden), f"dnn.hidden = {d.hidden}: expected positive layer widths"),
        (0 <= d.dropout < 1, f"dnn.dropout = {d.dropout}: expected 0 <= dropout < 1"),
        (d.input in ("probs", "logits"), f"dnn.input = {d.input!r}: expected probs or logits"),
        (bool(cfg.coherent.strategies), "coherent.strategies: expected scratch, transfer or both"),
    ]
    for p in cfg.phases:
        checks.append((p in PHASES, f"phases: unknown phase {p!r}; expected some of {', '.join(PHASES)}"))
    for s in cfg.coherent.strategies:
        checks.append((s in STRATEGIES, f"coherent.strategies: unknown strategy {s!r}; expected scratch or transfer"))
    checks += _train_checks("local", cfg.local) + _train_checks("global", cfg.global_)
    checks += _train_checks("coherent.scratch", cfg.coherent.scratch)
    checks += _train_checks("coherent.transfer", cfg.coherent.transfer) + _train_checks("dnn", cfg.dnn)
    for ok, message in checks:
        if not ok:
            raise UserError(message)

    parse_signals(cfg.preemption.signals)
    cfg.phases = [p for p in PHASES if p in cfg.phases]


def parse_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected KEY=VALUE, e.g. --set local.epochs=10")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return str(v)


def to_toml(cfg: Config) -> str:
    """The configuration as TOML that ``--config`` reads back to the same configuration."""
    lines, tables = [], []

    def walk(values: dict, name: str) -> None:
        scalars = {k: v for k, v in values.items() if not isinstance(v, dict)}
        if name:
            tables.append((name, scalars))
        else:
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in scalars.items())
        for k, v in values.items():
            if isinstance(v, dict):
                walk(v, f"{name}.{k}" if name else k)

    walk(cfg.to_dict(), "")
    for name, scalars in tables:
        if scalars:
            lines += ["", f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in scalars.items()]
    return "\n".join(lines) + "\n"
