"""The world of one rank: who it is, its device and threads, its subdomains, its communicators.

``init_world`` is the only place that touches ``MPI.COMM_WORLD``; launcher parsing
(``hpcdd.parallel.launcher``), ownership (``hpcdd.parallel.ownership``), device choice (``hpcdd.parallel.device``), the
collectives (``hpcdd.parallel.collectives``) and failure handling (``hpcdd.parallel.failures``) live in their own
modules. Phases receive a ``World``: its ``Group``s for data-parallel work, and its communicator
only to hand to a collective of ``hpcdd.parallel.collectives`` (``bcast_array``, ``gather_outputs``).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from typing import Mapping

from .. import __version__
from ..errors import AgreedError, UserError
from . import collectives
from .collectives import Group
from .device import select_device
from .failures import abort_every_rank, orderly_exit, record_failure
from .launcher import WorldInfo, check_slurm_size, node_cores, world_info
from .ownership import Ownership, ownership


@dataclass
class World:
    """What a rank knows about the job; ``comm`` is None when MPI is not used."""

    info: WorldInfo
    comm: object = None
    device: object = None
    threads: int = 1
    own: Ownership | None = None
    replicas: Group = field(default_factory=Group)  # the replicas of this rank's subdomain
    run_dir: str | None = None  # where an abort records why (RUN/FAILED)
    software: dict = field(default_factory=dict)  # versions every rank agreed on (hpcdd, torch, MPI library, ...)

    @property
    def rank(self) -> int:
        return self.info.rank

    @property
    def size(self) -> int:
        return self.info.size

    @property
    def is_root(self) -> bool:
        return self.info.rank == 0

    @property
    def everyone(self) -> Group:
        return Group(self.comm if self.size > 1 else None)

    def barrier(self) -> None:
        if self.comm is not None and self.size > 1:
            self.comm.Barrier()

    def idle_barrier(self) -> None:
        self.everyone.idle_barrier()

    def allgather_obj(self, obj) -> list:
        return collectives.allgather_obj(self.comm, obj)

    def bcast_obj(self, obj, root: int = 0):
        return collectives.bcast_obj(self.comm, obj, root)

    def set_ownership(self, n: int) -> Ownership:
        self.own = ownership(self.size, n, self.rank)
        if self.comm is not None and self.size > 1:
            color = self.own.subdomains[0] if self.own.replicas > 1 else self.rank
            group = self.comm.Split(color, self.rank)
            self.replicas = Group(group if self.own.replicas > 1 else None)
        return self.own

    def agree(self, error: str | None) -> str | None:
        """Collective: every rank learns the first rank's error, if any rank has one."""
        errors = self.allgather_obj(error)
        for r, e in enumerate(errors):
            if e is not None:
                return e if self.size == 1 else (e if all(x == e for x in errors) else f"rank {r}: {e}")
        return None

    def checked(self, check):
        """Collective: run ``check()`` on every rank; if it raises a UserError on any rank, every rank
        raises the same one-line error (so none is left waiting in a later collective)."""
        result, error = None, None
        try:
            result = check()
        except UserError as e:
            error = str(e)
        error = self.agree(error)
        if error:
            raise AgreedError(error)
        return result

    def finalize(self) -> None:
        if self.comm is not None:
            from mpi4py import MPI

            if not MPI.Is_finalized():
                MPI.Finalize()
            self.comm = None

    def abort(self, code: int, message: str = "") -> None:
        """End every rank: record why in RUN/FAILED first, so the ranks MPI_Abort takes down with
        this one are not reported as the cause by their watchers."""
        if self.run_dir:
            record_failure(self.run_dir, message)
        orderly_exit()
        if self.comm is not None and self.size > 1:
            abort_every_rank(self.comm, code)  # flushes this rank's output first
        raise SystemExit(code)


def software(with_mpi: bool = True) -> dict:
    """What every rank must run the same of: a mixed installation across nodes fails in odd ways later."""
    import mpi4py
    import numpy
    import torch

    out = {"hpcdd": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
           "mpi4py": mpi4py.__version__, "python": platform.python_version()}
    if with_mpi:
        from mpi4py import MPI

        out["MPI library"] = MPI.Get_library_version().strip().splitlines()[0].strip()
    return out


def hosts_of(ranks: list[int], hosts: list[str]) -> str:
    """'node2 (ranks 2, 3)' for the ranks given, grouped by host."""
    by_host: dict[str, list[int]] = {}
    for r in ranks:
        by_host.setdefault(hosts[r], []).append(r)
    return "; ".join(f"{h} (rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))})" for h, rs in by_host.items())


def same_software(reports: list[tuple[str, dict]]) -> None:
    hosts = [h for h, _ in reports]
    first = reports[0][1]
    for key in first:
        values = [v[key] for _, v in reports]
        if any(v != first[key] for v in values):
            groups: dict[str, list[int]] = {}
            for r, v in enumerate(values):
                groups.setdefault(v, []).append(r)
            raise UserError(f"the ranks run different {key} versions: " + " vs ".join(
                f"{v} on {hosts_of(rs, hosts)}" for v, rs in groups.items()) + "; install the same environment on every node")


def init_world(env: Mapping[str, str] | None = None, device: str = "auto", threads: int | None = None,
               use_mpi: bool = True) -> World:
    """Pin the device first, then set up MPI (mpi4py is imported here, not at module import)."""
    env = os.environ if env is None else env
    comm = None
    rank = size = None
    early = world_info(env)
    device_error, early_device = None, None
    if early.local_rank is not None:  # pin the GPU before MPI initialises (CUDA-aware MPI needs it)
        try:
            early_device = select_device(early, device)
        except UserError as e:
            device_error = str(e)
    if use_mpi:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        rank, size = comm.Get_rank(), comm.Get_size()
    info = world_info(env, rank, size)
    if comm is not None and (info.local_rank is None or info.local_size is None):
        from mpi4py import MPI

        local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
        info = WorldInfo(info.rank, info.size, local.Get_rank(), local.Get_size(), info.launcher,
                         info.slurm_ntasks, info.cpus_per_task)
        local.Free()
    world = World(info=info, comm=comm)
    import torch

    world.threads = threads or node_cores(info)
    torch.set_num_threads(world.threads)

    def check():
        world.software = software(comm is not None)
        same_software(world.allgather_obj((platform.node(), world.software)))
        if device_error:
            raise UserError(device_error)
        world.device = early_device if early_device is not None and info.local_rank == early.local_rank \
            else select_device(info, device)
        check_slurm_size(info)

    world.checked(check)
    return world
