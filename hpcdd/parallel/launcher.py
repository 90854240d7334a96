"""The launcher: rank, size, local rank and threads from srun / mpirun / mpiexec environment variables.

``world_info`` is a pure function of (environment, MPI rank, MPI size), testable without MPI.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from ..errors import UserError

# (launcher, rank variable, local rank variable, local size variable), most specific first.
_LAUNCHERS = (
    ("slurm", "SLURM_PROCID", "SLURM_LOCALID", None),
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("mpich", "PMI_RANK", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ("pmi", "PMI_RANK", "PMI_LOCAL_RANK", "PMI_LOCAL_SIZE"),
)


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    size: int
    local_rank: int | None
    local_size: int | None
    launcher: str
    slurm_ntasks: int | None = None
    cpus_per_task: int | None = None


def _int(env: Mapping[str, str], key: str | None) -> int | None:
    if key is None or key not in env:
        return None
    try:
        return int(str(env[key]).strip())
    except ValueError:
        return None


def slurm_tasks_on_node(tasks_per_node: str, node_id: int) -> int | None:
    """Parse SLURM_TASKS_PER_NODE (e.g. ``"4(x2),3"``) for the node with index ``node_id``."""
    counts = []
    for part in tasks_per_node.split(","):
        part = part.strip()
        if "(x" in part:
            n, rep = part.rstrip(")").split("(x")
            counts += [int(n)] * int(rep)
        elif part:
            counts.append(int(part))
    return counts[node_id] if 0 <= node_id < len(counts) else None


def world_info(env: Mapping[str, str], rank: int | None = None, size: int | None = None) -> WorldInfo:
    """Rank, size, local rank and local size from the launcher's environment variables.

    ``rank``/``size`` are the MPI values when known. A launcher's variables are trusted only when
    its rank agrees with ``rank`` (``mpirun`` inside an ``sbatch`` script inherits SLURM's
    variables of the batch step, which then describe a different process). Local rank/size that
    no variable gives are ``None``: ``init_world`` fills them from an MPI shared-memory split.
    """
    for launcher, rank_var, local_var, local_size_var in _LAUNCHERS:
        env_rank, local = _int(env, rank_var), _int(env, local_var)
        if local is None or (rank is not None and env_rank is not None and env_rank != rank):
            continue
        local_size = _int(env, local_size_var)
        if launcher == "slurm" and "SLURM_TASKS_PER_NODE" in env:
            try:
                local_size = slurm_tasks_on_node(env["SLURM_TASKS_PER_NODE"], _int(env, "SLURM_NODEID") or 0)
            except ValueError:
                local_size = None
        return WorldInfo(
            rank=rank if rank is not None else (env_rank or 0),
            size=size if size is not None else (_int(env, "SLURM_NTASKS") if launcher == "slurm" else None) or 1,
            local_rank=local, local_size=local_size, launcher=launcher,
            slurm_ntasks=_int(env, "SLURM_NTASKS"), cpus_per_task=_int(env, "SLURM_CPUS_PER_TASK"))
    return WorldInfo(rank=rank or 0, size=size or 1, local_rank=None if size and size > 1 else 0,
                     local_size=None if size and size > 1 else 1, launcher="none",
                     slurm_ntasks=_int(env, "SLURM_NTASKS"), cpus_per_task=_int(env, "SLURM_CPUS_PER_TASK"))


def check_slurm_size(info: WorldInfo) -> None:
    """srun with the wrong MPI plugin starts SLURM_NTASKS singletons of size 1: say how to fix it."""
    if info.slurm_ntasks is not None and info.size != info.slurm_ntasks:
        raise UserError(
            f"MPI sees {info.size} rank(s) but SLURM_NTASKS={info.slurm_ntasks}: srun started the tasks "
            f"without a matching MPI plugin; use `srun --mpi=pmi2` (MPICH) or `srun --mpi=pmix` (Open MPI)")


def _cores() -> tuple[int, int]:
    """(cores this process may run on, cores on the node)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return cores, os.cpu_count() or cores


def node_cores(info: WorldInfo) -> int:
    """Torch threads for this rank: SLURM's cpus-per-task, else cores on the node / ranks on it."""
    if info.cpus_per_task:
        return max(1, info.cpus_per_task)
    cores, total = _cores()
    if cores < total:
        return max(1, cores)  # the launcher bound this rank to its own cores
    return max(1, cores // max(1, info.local_size or 1))


def oversubscribed(info: WorldInfo, cores: tuple[int, int] | None = None) -> bool:
    """More ranks on this node than cores (and no binding): what one rank computes while another
    waits then only takes cores from the busy one. ``cores``: ``_cores()``, given in tests."""
    if info.cpus_per_task:
        return False
    mine, total = cores or _cores()
    return mine >= total and (info.local_size or 1) > total


