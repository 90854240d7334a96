"""Parallel data_prep over MPI ranks (``srun -n P python -m data_prep ...``, ``mpiexec``) without parallel HDF5.

Every rank walks the same chunks in the same order; for each chunk, each rank decodes a contiguous
slice (with its own ``--workers`` processes) and sends it to rank 0, the only writer. The output is
therefore identical for any number of ranks or workers. Errors travel with the slices: a rank that
cannot decode a file reports it, and every rank stops with rank 0's one line. Every wait is bounded
(``--timeout``); a rank that stays silent is named and the job is aborted. Rank 0 writes into a hidden
temporary folder renamed into place at the end, so a job killed half-way leaves nothing that looks
like a finished output.
"""

from __future__ import annotations

import os
import socket
import time

import numpy as np

from hpcdd.errors import AgreedError, UserError

TAG = 7301


class Ranks:
    """One rank (no MPI), or the ranks of ``MPI.COMM_WORLD``."""

    def __init__(self, comm=None, timeout: float = 600.0):
        self.comm, self.timeout = comm, timeout
        self.rank = comm.Get_rank() if comm is not None else 0
        self.size = comm.Get_size() if comm is not None else 1
        self.hosts = comm.allgather(socket.gethostname()) if comm is not None else [socket.gethostname()]

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def slice(self, rows: np.ndarray) -> np.ndarray:
        """This rank's contiguous part of ``rows``."""
        return np.array_split(rows, self.size)[self.rank]

    def read(self, images, rows: np.ndarray):
        """The images of ``rows`` on rank 0 (None elsewhere), decoded by all ranks."""
        return self._collect(lambda part: images.read(part), rows, to_all=False, join=np.concatenate)

    def hashes(self, images, rows: np.ndarray) -> np.ndarray:
        return self._collect(lambda part: images.hashes(part), rows, to_all=True, join=np.concatenate)

    def bad(self, images, rows: np.ndarray):
        def join(parts):
            return np.concatenate([p[0] for p in parts]), [m for p in parts for m in p[1]]
        return self._collect(lambda part: images.bad(part), rows, to_all=True, join=join)

    def bcast(self, obj):
        """Rank 0's ``obj`` on every rank (bounded wait)."""
        if self.size == 1:
            return obj
        if self.is_root:
            for r in range(1, self.size):
                self.comm.send(obj, dest=r, tag=TAG)
            return obj
        return self._recv(0)

    def agree(self, check) -> None:
        """Run ``check`` on rank 0 only (output checks, space); its UserError stops every rank."""
        error = None
        if self.is_root:
            try:
                check()
            except UserError as e:
                error = str(e)
        error = self.bcast(error)
        if error is not None:
            raise AgreedError(error)

    def together(self, fn):
        """Run ``fn`` on every rank; the first rank's UserError (in rank order) stops every rank."""
        try:
            out, error = fn(), None
        except UserError as e:
            out, error = None, str(e)
        if self.size > 1:
            if self.is_root:
                errors = [error] + [self._recv(r) for r in range(1, self.size)]
                error = next((e for e in errors if e), None)
            else:
                self.comm.send(error, dest=0, tag=TAG)
            error = self.bcast(error)
        if error is not None:
            raise AgreedError(error)
        return out

    def abort(self, code: int) -> None:
        if self.comm is not None and self.size > 1:
            from hpcdd.parallel.failures import abort_every_rank

            abort_every_rank(self.comm, code)

    def _collect(self, fn, rows, to_all: bool, join):
        try:
            mine = ("ok", fn(self.slice(rows)))
        except UserError as e:
            mine = ("error", str(e))
        if self.size == 1:
            if mine[0] == "error":
                raise AgreedError(mine[1])
            return mine[1]
        if self.is_root:
            parts = [mine] + [self._recv(r) for r in range(1, self.size)]
            errors = [p[1] for p in parts if p[0] == "error"]
            status = ("error", errors[0]) if errors else ("ok", join([p[1] for p in parts]))
            reply = status if to_all or errors else ("ok", None)
            for r in range(1, self.size):
                self.comm.send(reply, dest=r, tag=TAG)
            if errors:
                raise AgreedError(errors[0])
            return status[1]
        self.comm.send(mine, dest=0, tag=TAG)
        status = self._recv(0)
        if status[0] == "error":
            raise AgreedError(status[1])
        return status[1]

    def _recv(self, source: int):
        """A message from ``source`` within ``timeout`` seconds (matched probe: no other message is taken)."""
        deadline = time.monotonic() + self.timeout
        pause = 0.0005
        while True:
            msg = self.comm.improbe(source=source, tag=TAG)
            if msg is not None:
                return msg.recv()
            if time.monotonic() > deadline:
                raise UserError(f"rank {source} (host {self.hosts[source]}) sent nothing for {self.timeout:.0f} s "
                                f"(--timeout); stopped the whole preparation")
            time.sleep(pause)
            pause = min(pause * 2, 0.005)  # a peer that waits on rank 0 writing a chunk is on within 5 ms


def launched_tasks(env) -> int:
    """How many tasks a launcher started (1: plain ``python``, also inside an sbatch script)."""
    for key in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"):
        if env.get(key, "").isdigit():
            return int(env[key])
    if "SLURM_STEP_ID" in env and env.get("SLURM_STEP_NUM_TASKS", "").isdigit():
        return int(env["SLURM_STEP_NUM_TASKS"])
    return 1


def init_ranks(timeout: float) -> Ranks:
    """MPI ranks when a launcher (srun, mpiexec, mpirun) started several tasks, else one rank without MPI."""
    if launched_tasks(os.environ) <= 1:
        return Ranks(None, timeout)
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    return Ranks(comm if comm.Get_size() > 1 else None, timeout)
