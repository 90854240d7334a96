"""Several local CNNs of one rank trained as one grouped model (``performance.fuse_local``), and the
policy of which ones do (``fuses``, ``shape_groups``).

A rank that owns several subdomains with the same subimage shape can train their local CNNs as one
computation: every convolution becomes one grouped convolution (member m's channels are the m-th
block), BatchNorm runs over all members' channels (it is per channel anyway), every linear layer
becomes one batched matrix product, and dropout draws each member's mask from that member's own
generator exactly as ``F.dropout`` draws it on the CPU. Each member keeps its own parameters (a
block of the fused tensors), optimizer state (Adam, AdamW and SGD are elementwise), minibatch order
(the local CNNs share one) and dropout stream, so fused training computes what training the members
one after another computes, to float tolerance (tests/test_fused.py). Weights and checkpoints are
read and written per member in the unfused format, so a fused run and an unfused one can resume
each other.

Measured on the 2-core CPU (1 thread, batch 128, one training step, channels_last): two VGG local
CNNs of a 4x4 grid (9x9 subimages) 17 -> 12 ms, four 35 -> 20 ms; two on 32x32 subimages 100 -> 85-95 ms.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .training import rng

_SAME = (nn.ReLU, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Identity)
_CONV = (nn.Conv2d, nn.Conv3d)
_NORM = (nn.BatchNorm2d, nn.BatchNorm3d)


class GroupedLinear(nn.Module):
    """G independent linear layers: (B, G, in) -> (B, G, out); weight (G, out, in), bias (G, out)."""

    def __init__(self, layers):
        super().__init__()
        self.weight = nn.Parameter(torch.stack([layer.weight.detach() for layer in layers]))
        self.bias = nn.Parameter(torch.stack([layer.bias.detach() for layer in layers])) \
            if layers[0].bias is not None else None

    @property
    def out_features(self) -> int:
        return self.weight.shape[1]

    def forward(self, x):
        out = torch.bmm(x.transpose(0, 1), self.weight.transpose(1, 2))
        if self.bias is not None:
            out = out + self.bias.unsqueeze(1)
        return out.transpose(0, 1)


class MemberFlatten(nn.Module):
    """(B, G*C, ...) -> (B, G, C*...): each member's features, in the order ``nn.Flatten`` gives it."""

    def __init__(self, members: int):
        super().__init__()
        self.members = members

    def forward(self, x):
        return x.reshape(x.shape[0], self.members, -1)


class MemberDropout(nn.Module):
    """Dropout on (B, G, F) with member g's mask drawn from ``generators[g]`` as ``F.dropout`` draws it
    from the global generator on the CPU (``empty_like(x).bernoulli_(1 - p)``), so each member sees the
    mask it would see alone."""

    def __init__(self, p: float, generators: list):
        super().__init__()
        self.p = p
        self.generators = generators

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = 1.0 - self.p
        masks = [torch.empty((x.shape[0],) + tuple(x.shape[2:]), dtype=x.dtype, device=x.device)
                 .bernoulli_(keep, generator=g) for g in self.generators]
        return x * torch.stack(masks, 1).div_(keep)


def fusable(model: nn.Module) -> bool:
    """Whether every layer of ``model`` has a fused form (our CNN families do)."""
    known = _SAME + _CONV + _NORM + (nn.Linear, nn.Flatten, nn.Dropout)
    return all(isinstance(m, known) for m in model.modules() if not list(m.children()))


def state_dicts_of(module: nn.Module) -> list:
    """Each member's weights in the unfused format (one state dict for a model that is not fused)."""
    return module.member_state_dicts() if isinstance(module, Fused) else [module.state_dict()]


def load_state_dicts(module: nn.Module, states: list) -> None:
    """``state_dicts_of``'s inverse."""
    if isinstance(module, Fused):
        module.load_member_state_dicts(states)
    else:
        module.load_state_dict(states[0])


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


class Fused(nn.Module):
    """G models of one architecture and input shape as one: input (B, G*C, *spatial) (the members'
    inputs along channels, ``data.MemberData``), output (B, G, K). ``streams`` (one ``rng.Stream`` per member) seed the members' dropout per step."""

    def __init__(self, models: list, streams: list, device="cpu"):
        super().__init__()
        self.members = len(models)
        self.streams = streams
        self.generators = [torch.Generator(device=device) for _ in models]
        net = copy.deepcopy(models[0])
        layers = [dict(m.named_modules()) for m in models]
        kinds = {}
        for name, module in list(net.named_modules()):
            same = [found[name] for found in layers]
            new = None
            if isinstance(module, _CONV):
                g = self.members
                new = type(module)(module.in_channels * g, module.out_channels * g, module.kernel_size,
                                   module.stride, module.padding, module.dilation, module.groups * g,
                                   module.bias is not None, module.padding_mode)
                new.weight.data = torch.cat([m.weight.detach() for m in same])
                if module.bias is not None:
                    new.bias.data = torch.cat([m.bias.detach() for m in same])
                kinds.update({f"{name}.weight": "cat", f"{name}.bias": "cat"})
            elif isinstance(module, _NORM):
                new = type(module)(module.num_features * self.members, module.eps, module.momentum, module.affine,
                                   module.track_running_stats)
                for key in ("weight", "bias", "running_mean", "running_var"):
                    if getattr(module, key) is not None:
                        getattr(new, key).data = torch.cat([getattr(m, key).detach() for m in same])
                        kinds[f"{name}.{key}"] = "cat"
                if module.num_batches_tracked is not None:
                    new.num_batches_tracked.data = module.num_batches_tracked.detach().clone()
            elif isinstance(module, nn.Linear):
                new = GroupedLinear(same)
                kinds.update({f"{name}.weight": "stack", f"{name}.bias": "stack"})
            elif isinstance(module, nn.Flatten):
                new = MemberFlatten(self.members)
            elif isinstance(module, nn.Dropout):
                new = MemberDropout(module.p, self.generators)
            if new is not None:
                _replace(net, name, new)
        self.net = net.to(device)
        self._kinds = kinds  # member state-dict key -> how the members' tensors make the fused one

    def forward(self, x):
        return self.net(x)

    def seed_step(self, epoch: int, step: int, *more: int) -> None:
        """Seed every member's dropout as ``seed_torch(*stream.step_counters(...))`` seeds it unfused."""
        self.seed_members([rng.mix(*stream.step_counters(epoch, step, *more)) for stream in self.streams])

    def seed_members(self, seeds: list) -> None:
        """Member g's dropout draws as it would after ``torch.manual_seed(seeds[g])`` unfused."""
        for g, seed in zip(self.generators, seeds):
            g.manual_seed(seed)

    def _split(self, key: str, value: torch.Tensor) -> list:
        kind = self._kinds.get(key)
        if kind == "cat":
            return [part.clone() for part in value.chunk(self.members, 0)]
        if kind == "stack":
            return [part.clone() for part in value.unbind(0)]
        return [value.clone() for _ in range(self.members)]  # shared: BatchNorm's step count

    def _join(self, key: str, values: list) -> torch.Tensor:
        kind = self._kinds.get(key)
        if kind == "cat":
            return torch.cat(values, 0)
        if kind == "stack":
            return torch.stack(values, 0)
        return values[0]

    def member_state_dicts(self) -> list:
        """Each member's weights and buffers, with the keys and shapes of the unfused model."""
        out = [{} for _ in range(self.members)]
        for key, value in self.net.state_dict().items():
            for d, part in zip(out, self._split(key, value)):
                d[key] = part
        return out

    def load_member_state_dicts(self, members: list) -> None:
        self.net.load_state_dict({key: self._join(key, [m[key] for m in members]) for key in members[0]})

    def _param_keys(self) -> list:
        return [name for name, _ in self.net.named_parameters()]

    def member_optimizer_states(self, state: dict) -> list:
        """The fused optimizer's ``state_dict()`` as each member's (per-parameter tensors split like
        the parameter; step counts shared)."""
        keys, params = self._param_keys(), list(self.net.parameters())
        out = [{"state": {}, "param_groups": copy.deepcopy(state["param_groups"])} for _ in range(self.members)]
        for index, entry in state["state"].items():
            parts = {k: self._split(keys[index], v) if torch.is_tensor(v) and v.shape == params[index].shape
                     else [v] * self.members for k, v in entry.items()}
            for m in range(self.members):
                out[m]["state"][index] = {k: p[m] for k, p in parts.items()}
        return out

    def load_member_optimizer_states(self, optimizer, members: list) -> None:
        keys = self._param_keys()
        state = {}
        for index in members[0]["state"]:
            entries = [m["state"][index] for m in members]
            state[index] = {k: self._join(keys[index], [e[k] for e in entries]) if torch.is_tensor(v) and v.dim() > 0
                            else v for k, v in entries[0].items()}
        optimizer.load_state_dict({"state": state, "param_groups": members[0]["param_groups"]})


# Fused training pays where per-operator overhead dominates: narrow local CNNs. Measured on the 2-core
# CPU (1 thread, batch 128, a step fused against the members one after another): VGG widths 8..32 on
# 9x9 subimages 1.4x (2 members) and 1.75x (4), 11x11 1.3x (2), 15x15 1.03x (4); widths 11..45 on 9x9
# 1.25x (2); widths 16..64 on 15x15 1.0x (2) and 0.84x (4); ResNet-18 layout widths 4..32 on 32x36 1.7x (2).
FUSE_MAX_WIDTH = 48


def fuses(setting: str, device, replicas: int, model) -> bool:
    """Whether local CNNs of one shape train fused: "on", or "auto" on the CPU for CNNs whose widest
    convolution has at most FUSE_MAX_WIDTH channels (not yet measured on a GPU); never with replicas
    (a rank then owns one subdomain)."""
    if setting == "off" or replicas > 1 or not fusable(model):
        return False
    widest = max((m.out_channels for m in model.modules() if hasattr(m, "out_channels")), default=0)
    return setting == "on" or (str(device) == "cpu" and widest <= FUSE_MAX_WIDTH)


def shape_groups(models, subdomains: list, setting: str, device, replicas: int = 1) -> list:
    """Which of ``subdomains`` train as one fused model: groups of one subimage shape where ``fuses``
    says so, else one at a time. ``models``: a ``factory.Models`` (a run's, or a benchmark's)."""
    if len(subdomains) < 2 or not fuses(setting, device, replicas, models.plain_local(subdomains[0])):
        return [[i] for i in subdomains]
    groups: dict = {}
    for i in subdomains:
        groups.setdefault(models.manifest.subimage_shape(i), []).append(i)
    return sorted(groups.values())
