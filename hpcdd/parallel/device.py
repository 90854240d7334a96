"""Device choice: the GPU of the local rank when CUDA is there, otherwise the CPU."""

from __future__ import annotations

import os

from ..errors import UserError
from .launcher import WorldInfo


def select_device(info: WorldInfo, want: str = "auto"):
    """cuda:(local rank % GPUs) when CUDA is there (or asked for), else the CPU."""
    import torch

    if want not in ("auto", "cpu", "cuda"):
        raise UserError(f"device {want!r}: expected auto, cpu or cuda")
    has_cuda = torch.cuda.is_available() and torch.cuda.device_count() > 0
    if want == "cuda" and not has_cuda:
        raise UserError("device 'cuda' requested but no CUDA device is available on "
                        f"{os.uname().nodename}; use device = \"auto\" or \"cpu\"")
    if want != "cpu" and has_cuda:
        index = (info.local_rank or 0) % torch.cuda.device_count()
        torch.cuda.set_device(index)
        torch.backends.cudnn.benchmark = True  # fixed input sizes per model: let cuDNN pick kernels
        return torch.device("cuda", index)
    return torch.device("cpu")


