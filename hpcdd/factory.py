"""Building what a phase trains on: the models of a run (seeded per subdomain) and its data splits.

Tests and benchmarks use these directly: ``Models(cfg.model, cfg.dnn, manifest, seed)`` gives the
same local CNN ``i`` that any rank of a run builds, without a run directory or MPI.
"""

from __future__ import annotations

import torch

from .aggregators import DNN
from .data import ShardReader, SplitData, stream_plan
from .fused import Fused
from .manifest import Manifest
from .models import build_model, default_width_scale
from .training import rng
from .training.acceleration import accelerate, for_inference


class Models:
    """Local CNN ``i``, the global CNN and the DNN, each initialised from (seed, its own tag)."""

    def __init__(self, model_cfg, dnn_cfg, manifest: Manifest, seed: int, device="cpu", performance=None):
        self.performance = performance  # PerformanceConfig: channels_last, compile (None: plain eager)
        self.spec = model_cfg
        self.dnn_cfg = dnn_cfg
        self.manifest = manifest
        self.seed = seed
        self.device = device
        self.width_scale = model_cfg.local_width_scale or default_width_scale(manifest.n)

    def local(self, i: int) -> torch.nn.Module:
        return self._fast(self.plain_local(i))

    def plain_local(self, i: int) -> torch.nn.Module:
        """Local CNN ``i`` as built, on the CPU, without channels_last or compilation."""
        m = self.manifest
        torch.manual_seed(rng.mix(self.seed, rng.TAG_INIT, i))
        return build_model(self.spec, m.channels, m.subimage_shape(i), m.k, self.width_scale)

    def fused(self, subdomains: list, streams: list) -> Fused:
        """The local CNNs of ``subdomains`` (one subimage shape) as one grouped model, each member
        initialised as ``local(i)`` is."""
        return self._fast(Fused([self.plain_local(i) for i in subdomains], streams, self.device))

    def group(self, subdomains) -> torch.nn.Module:
        """The module that trains ``subdomains`` together: local CNN ``i`` alone, or several of one
        subimage shape fused, each member with the dropout stream it has alone."""
        if len(subdomains) == 1:
            return self.local(subdomains[0])
        return self.fused(list(subdomains), [rng.stream_of(self.seed, "local", i) for i in subdomains])

    def global_(self) -> torch.nn.Module:
        m = self.manifest
        torch.manual_seed(rng.mix(self.seed, rng.TAG_INIT, rng.TAG_GLOBAL))
        return self._fast(build_model(self.spec, m.channels, m.spatial, m.k, 1.0))

    def _fast(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        if self.performance is None:
            return model
        return accelerate(model, self.manifest.dims, self.performance, self.device)

    def inference(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` for passes over whole splits: BatchNorm folded (``acceleration.for_inference``)."""
        if self.performance is None:
            return model
        return for_inference(model, self.manifest.dims, self.performance, self.device)

    def dnn(self) -> DNN:
        torch.manual_seed(rng.mix(self.seed, rng.TAG_INIT, rng.TAG_DNN))
        d = self.dnn_cfg
        return DNN(self.manifest.n, self.manifest.k, tuple(d.hidden), d.dropout).to(self.device)


class DataCache:
    """Splits of shards (``index`` None: full.h5), each loaded once per process and released on demand."""

    def __init__(self, manifest: Manifest, memory_limit_gb: float, device="cpu", on_device: bool = True):
        self.manifest = manifest
        self.memory_limit = int(memory_limit_gb * (1 << 30))
        self.device = device
        self.on_device = on_device
        self._data: dict = {}

    def __call__(self, index: int | None, split: str, mirrored: bool = False) -> SplitData:
        """Split ``split`` of shard ``index``; ``mirrored``: with its mirror's (``augment_flip``)."""
        data = self._load(index, split)
        if mirrored and data.mirror is None:
            mirror = index if index is None else self.manifest.decomposition().mirror(index)
            data.mirror = data if mirror == index else self._load(mirror, split)
        return data

    def _load(self, index: int | None, split: str) -> SplitData:
        key = (index, split)
        if key not in self._data:
            m = self.manifest
            # one plan per training: all subdomain shards together (the coherent step reads them with
            # one order), full.h5 alone
            plan = stream_plan(m, [None] if index is None else range(m.n), split, self.memory_limit)
            data = SplitData.load(ShardReader(m, index), split, self.memory_limit, plan)
            self._data[key] = data.to_device(self.device) if self.on_device else data
        return self._data[key]

    def release(self, index: int | None = None, everything: bool = False) -> None:
        for key in [k for k in self._data if everything or k[0] == index]:
            self._data.pop(key).close()
