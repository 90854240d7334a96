"""How a CNN runs fastest on its device: channels-last memory format and ``torch.compile``, each a switch.

Measured on the 2-core CPU machine (1 thread, batch 128, one training step of our VGG defaults;
benchmarks/bench_local.py): channels_last made a step 17-22 % faster for the local CNNs and the global
CNN alike, at no start-up cost, so ``auto`` turns it on for every 2D CNN (and channels_last_3d for every
3D CNN: 1.3-1.7x faster steps). ``torch.compile`` made a step
0-30 % faster but took 20-34 s to compile each model in each process: more than it saves in runs of a
few thousand steps per model, so on the CPU ``auto`` leaves it off (``on`` asks for it); on a GPU,
where small models are bound by kernel launches, ``auto`` compiles. Both are applied in place, so
state_dict keys, checkpoints and exported models do not change.

Two process-wide switches (``configure``) help the small models most. Subnormal floats: the DNN's
weights and Adam's second moments drift into the subnormal range in later epochs, and each
operation on them costs ~100x on x86; the DNN's epochs got 4x slower after epoch 20 (0.10 -> 0.43
s), flushing them to zero keeps 0.10 s. Fused optimizer kernels (one kernel per parameter instead
of ~10 operations): an Adam step of a 4x4 local CNN 0.78 -> 0.19 ms, of the DNN 0.19 -> 0.09 ms.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil

import torch

CHOICES = ("auto", "on", "off")


def wants_channels_last(setting: str, dims: int) -> bool:
    """channels-last exists for 2D (NCHW: ``channels_last``) and 3D (NCDHW: ``channels_last_3d``) tensors;
    ``auto`` and ``on`` use it for both. 3D, measured (1 thread, one training step of the VGG defaults,
    benchmarks/bench_local.py --volume): 14^3 local 1.6x, 32^3 local 1.7x, 28^3 global 1.3x faster."""
    return setting != "off" and dims in (2, 3)


def memory_format(dims: int):
    return torch.channels_last_3d if dims == 3 else torch.channels_last


def compiler_problem(device) -> str | None:
    """Why ``torch.compile`` cannot work here (None: it can): the C++ compiler inductor needs on the
    CPU, Triton on a GPU."""
    if str(device).startswith("cuda"):
        return None if importlib.util.find_spec("triton") else "Triton is not installed (pip install triton)"
    cxx = os.environ.get("CXX") or "c++"
    if shutil.which(cxx) or shutil.which("g++"):
        return None
    return f"no C++ compiler found ({cxx!r} or 'g++' on PATH; torch.compile's CPU backend needs one)"


def wants_compile(setting: str, device) -> tuple[bool, str]:
    """(compile?, the reason, for the log)."""
    if setting == "off":
        return False, "off (performance.compile = \"off\")"
    problem = compiler_problem(device)
    if setting == "on":
        return problem is None, "on" if problem is None else f"off: {problem}"
    if str(device).startswith("cuda"):
        return (problem is None), "on (auto, GPU)" if problem is None else f"off (auto): {problem}"
    return False, "off (auto on the CPU: compiling each model costs more than it saves in short runs; " \
                  "performance.compile = \"on\" for long ones)"


_FUSED_OPTIMIZER = True
_AUTOCAST = None  # torch.bfloat16 under performance.autocast = "bf16"


def configure(perf) -> str:
    """Apply the process-wide switches of ``perf``; returns what they did, for the log."""
    global _FUSED_OPTIMIZER, _AUTOCAST
    _FUSED_OPTIMIZER = perf.fused_optimizer != "off"
    _AUTOCAST = torch.bfloat16 if perf.autocast == "bf16" else None
    flush = perf.flush_denormal != "off" and torch.set_flush_denormal(True)
    if not flush:
        torch.set_flush_denormal(False)
    return (f"autocast {perf.autocast}, fused optimizer {'on' if _FUSED_OPTIMIZER else 'off'}, subnormals "
            f"{'flushed' if flush else 'kept (' + ('off' if perf.flush_denormal == 'off' else 'CPU lacks it') + ')'}")


def autocast_problem(device) -> str | None:
    """Why bf16 autocast cannot run on ``device`` (None: it can)."""
    if str(device).startswith("cuda") and not torch.cuda.is_bf16_supported():
        return f"{torch.cuda.get_device_name(device)} has no bfloat16 support"
    return None


def autocast(device):
    """The CNNs' forward in mixed precision (``performance.autocast = "bf16"``), else a no-op context;
    losses, the DNN's inputs and everything that crosses ranks stay float32."""
    if _AUTOCAST is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=_AUTOCAST)


def full_precision(x):
    """An autocast output back in float32 (other dtypes unchanged)."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def optimizer(cls, params, **kwargs):
    """``cls(params, **kwargs)`` with torch's fused kernels where this torch and device have them."""
    params = list(params)
    if _FUSED_OPTIMIZER:
        try:
            return cls(params, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError):
            pass  # not for this device/dtype, or an older torch: the per-tensor implementation
    return cls(params, **kwargs)


def _as_channels_last(module, args):
    x = args[0]
    if isinstance(x, torch.Tensor) and x.dim() in (4, 5):
        return (x.contiguous(memory_format=memory_format(x.dim() - 2)),) + tuple(args[1:])
    return None


def for_inference(model: torch.nn.Module, dims: int, perf, device) -> torch.nn.Module:
    """An eval-mode copy of ``model`` with every BatchNorm folded into the convolution before it
    (torch.fx), channels-last as ``perf`` says: one pass over the activations fewer per layer, for
    passes over whole splits (the aggregate phase's outputs, the global CNN's test score). Measured
    (1 thread, batch 512, local VGGs): 15x15 34.0 -> 30.3 ms, 9x9 7.6 -> 5.9 ms; outputs equal to
    float rounding (~1e-8). A compiled model, or one fx cannot trace, is returned as it is."""
    from torch.fx.experimental.optimization import fuse

    if wants_compile(perf.compile, device)[0]:
        return model
    was = model.training
    model.eval()
    try:
        folded = fuse(model)
    except Exception:  # fx cannot trace every module: folding is an optimisation, never a failure
        return model
    finally:
        model.train(was)
    if getattr(model, "members", 1) > 1:
        folded.members = model.members
    if wants_channels_last(perf.channels_last, dims):
        folded.to(memory_format=memory_format(dims))
        folded.register_forward_pre_hook(_as_channels_last)
    return folded


def accelerate(model: torch.nn.Module, dims: int, perf, device) -> torch.nn.Module:
    """The model in channels-last layout (its inputs converted on entry) and compiled, as ``perf`` says."""
    if wants_channels_last(perf.channels_last, dims):
        model.to(memory_format=memory_format(dims))
        model.register_forward_pre_hook(_as_channels_last)
    if wants_compile(perf.compile, device)[0]:
        # inductor's compiled kernels persist across phases, runs and (on a shared home) nodes
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hpcdd", "inductor"))
        model.compile()
    return model
