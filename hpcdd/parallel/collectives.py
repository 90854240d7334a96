"""Every collective a run makes, in one place (docs/architecture.md lists where each one happens).

Messages are numpy buffers with mpi4py's upper-case calls, not pickles, except for small
bookkeeping objects (``allgather_obj``/``bcast_obj``). A ``Group`` is a data-parallel set of workers
(the replicas of a subdomain, or every rank for the global CNN); ``Group()`` is one worker alone,
for which every call is a no-op.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Group:
    comm: object = None

    @property
    def size(self) -> int:
        return 1 if self.comm is None else self.comm.Get_size()

    @property
    def rank(self) -> int:
        return 0 if self.comm is None else self.comm.Get_rank()

    def sum(self, array: np.ndarray) -> np.ndarray:
        """Allreduce(SUM) of a small numpy array (returned; the input is summed in place)."""
        if self.size > 1:
            from mpi4py import MPI

            self.comm.Allreduce(MPI.IN_PLACE, array, op=MPI.SUM)
        return array

    def any(self, flag: bool) -> bool:
        """True on every worker when it is true on any (one tiny Allreduce(MAX))."""
        if self.size == 1:
            return flag
        from mpi4py import MPI

        buf = np.array([1 if flag else 0], dtype=np.int32)
        self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.MAX)
        return bool(buf[0])

    def mean_(self, tensors: list, count: int | None = None) -> None:
        """Replace ``tensors`` by their sum over the group divided by ``count`` (default: the size),
        through one flat float32 buffer and one Allreduce."""
        import torch

        if self.size == 1 or not tensors:
            return
        from mpi4py import MPI

        count = self.size if count is None else count
        flat = torch.cat([t.detach().reshape(-1).to("cpu", torch.float32) for t in tensors]).numpy()
        self.comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
        if count != 1:
            flat /= count
        offset = 0
        buf = torch.from_numpy(flat)
        for t in tensors:
            k = t.numel()
            t.copy_(buf[offset:offset + k].view_as(t))
            offset += k

    def sum_grads_(self, params: list) -> None:
        """Sum gradients over the group; missing gradients count as zeros."""
        import torch

        if self.size == 1:
            return
        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        self.mean_(grads, 1)

    def gather_obj(self, obj, root: int = 0) -> list | None:
        """Every worker's small object, in worker order, at ``root`` (None elsewhere)."""
        if self.size == 1:
            return [obj]
        return self.comm.gather(obj, root=root)

    def idle_barrier(self, poll: float = 0.005, while_waiting=None) -> None:
        """A barrier that sleeps while it waits: ranks that finish early do not spin on the cores
        the others still train on (MPI's blocking Barrier busy-polls). ``while_waiting()`` is called
        between polls (e.g. to forward a stop signal)."""
        if self.size == 1:
            return
        request = self.comm.Ibarrier()
        while not request.Test():
            if while_waiting is not None:
                while_waiting()
            time.sleep(poll)


def allgather_obj(comm, obj) -> list:
    if comm is None or comm.Get_size() == 1:
        return [obj]
    return comm.allgather(obj)


def bcast_obj(comm, obj, root: int = 0):
    if comm is None or comm.Get_size() == 1:
        return obj
    return comm.bcast(obj, root=root)


def gather_rows(comm, rows: np.ndarray, root: int = 0) -> np.ndarray | None:
    """Gatherv of float32 rows ``(k_r, ...)`` from every rank into ``(sum k_r, ...)`` at root (rank order)."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if comm is None or comm.Get_size() == 1:
        return rows
    from mpi4py import MPI

    rank = comm.Get_rank()
    counts = np.asarray(comm.allgather(rows.size), dtype=np.int64)
    out = np.empty(int(counts.sum()), dtype=np.float32) if rank == root else None
    displs = np.concatenate([[0], np.cumsum(counts)[:-1]])
    comm.Gatherv(rows.reshape(-1), [out, counts, displs, MPI.FLOAT] if rank == root else None, root=root)
    if rank != root:
        return None
    return out.reshape((-1,) + tuple(rows.shape[1:]))


def allgather_rows(comm, mine: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Allgatherv of float32 blocks of known sizes; returns (everything, displacements)."""
    from mpi4py import MPI

    displs = np.concatenate([[0], np.cumsum(counts)[:-1]])
    recv = np.empty(int(counts.sum()), dtype=np.float32)
    comm.Allgatherv(np.ascontiguousarray(mine, dtype=np.float32).reshape(-1), [recv, counts, displs, MPI.FLOAT])
    return recv, displs


def bcast_array(comm, array: np.ndarray | None, root: int = 0) -> np.ndarray:
    """Bcast a float32 array whose shape only root knows."""
    if comm is None or comm.Get_size() == 1:
        return array
    rank = comm.Get_rank()
    shape = comm.bcast(array.shape if rank == root else None, root=root)
    buf = np.ascontiguousarray(array, dtype=np.float32) if rank == root else np.empty(shape, np.float32)
    comm.Bcast(buf, root=root)
    return buf


def gather_outputs(comm, mine: np.ndarray) -> np.ndarray | None:
    """Per-subdomain outputs (n_owned, n, K) of every rank as (n, N, K) at rank 0 (None elsewhere).
    Ownership blocks are contiguous and in rank order, so the rows arrive in subdomain order; a rank
    with nothing to send (a replica) sends (0, n, K)."""
    full = gather_rows(comm, mine)
    return None if full is None else np.ascontiguousarray(full.transpose(1, 0, 2))
