"""The world: ranks, local ranks, device, subdomain ownership and the MPI plumbing.

``world_info`` and ``ownership`` are pure functions of (environment, size, N) so they can be
tested without MPI; ``init_world`` is the only place that touches ``MPI.COMM_WORLD``.
"""

from __future__ import annotations

import os
import sys
import traceback
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from .errors import EXIT_USER_ERROR, UserError

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


@dataclass(frozen=True)
class Ownership:
    """Which subdomains a rank trains. P <= N: a balanced block; P = R*N: replica r of one subdomain."""

    rank: int
    size: int
    n: int
    subdomains: tuple[int, ...]
    replicas: int
    replica: int

    @property
    def table(self) -> list[tuple[int, ...]]:
        return [ownership(self.size, self.n, r).subdomains for r in range(self.size)]


def ownership(size: int, n: int, rank: int) -> Ownership:
    if size <= n:
        first, last = rank * n // size, (rank + 1) * n // size
        return Ownership(rank, size, n, tuple(range(first, last)), 1, 0)
    if size % n == 0:
        replicas = size // n
        return Ownership(rank, size, n, (rank // replicas,), replicas, rank % replicas)
    fits = sorted({p for p in range(1, n + 1)} | {n * k for k in range(2, 5)})
    raise UserError(
        f"{size} ranks fit neither rule for {n} subdomains: use at most {n} ranks (each trains a block of "
        f"subdomains) or a multiple of {n} (replicas per subdomain), e.g. -n {', '.join(map(str, fits[-4:]))}")


def slice_rows(batch: int, parts: int, part: int) -> slice:
    """The rows of a minibatch that part ``part`` of ``parts`` data-parallel workers computes."""
    return slice(part * batch // parts, (part + 1) * batch // parts)


def node_cores(info: WorldInfo) -> int:
    """Torch threads for this rank: SLURM's cpus-per-task, else cores on the node / ranks on it."""
    if info.cpus_per_task:
        return max(1, info.cpus_per_task)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    if cores < (os.cpu_count() or cores):
        return max(1, cores)  # the launcher bound this rank to its own cores
    return max(1, cores // max(1, info.local_size or 1))


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


@dataclass
class World:
    """What a rank knows about the job; ``comm`` is None when MPI is not used."""

    info: WorldInfo
    comm: object = None
    device: object = None
    threads: int = 1
    group: object = None  # communicator of the replicas of this rank's subdomain
    own: Ownership | None = None
    extra: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.info.rank

    @property
    def size(self) -> int:
        return self.info.size

    @property
    def is_root(self) -> bool:
        return self.info.rank == 0

    def barrier(self) -> None:
        if self.comm is not None and self.size > 1:
            self.comm.Barrier()

    def idle_barrier(self, poll: float = 0.005) -> None:
        """A barrier that sleeps while it waits: ranks that finish early do not spin on the cores
        the others still train on (MPI's blocking Barrier busy-polls)."""
        if self.comm is None or self.size == 1:
            return
        import time

        request = self.comm.Ibarrier()
        while not request.Test():
            time.sleep(poll)

    def allgather_obj(self, obj):
        if self.comm is None or self.size == 1:
            return [obj]
        return self.comm.allgather(obj)

    def bcast_obj(self, obj, root: int = 0):
        if self.comm is None or self.size == 1:
            return obj
        return self.comm.bcast(obj, root=root)

    def set_ownership(self, n: int) -> Ownership:
        self.own = ownership(self.size, n, self.rank)
        if self.comm is not None and self.size > 1:
            color = self.own.subdomains[0] if self.own.replicas > 1 else self.rank
            self.group = self.comm.Split(color, self.rank)
        return self.own

    def agree(self, error: str | None) -> str | None:
        """Collective: every rank learns the first rank's error, if any rank has one."""
        errors = self.allgather_obj(error)
        for r, e in enumerate(errors):
            if e is not None:
                return e if self.size == 1 else (e if all(x == e for x in errors) else f"rank {r}: {e}")
        return None

    def finalize(self) -> None:
        if self.comm is not None:
            from mpi4py import MPI

            if not MPI.Is_finalized():
                MPI.Finalize()
            self.comm = None

    def abort(self, code: int, message: str = "") -> None:
        """End every rank: record why in RUN/FAILED first, so the ranks MPI_Abort takes down with
        this one are not reported as the cause by their watchers."""
        run_dir = self.extra.get("run_dir")
        if run_dir and os.path.isdir(run_dir):
            try:
                fd = os.open(failure_marker(run_dir), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                os.write(fd, (message + "\n").encode())
                os.close(fd)
            except OSError:
                pass
        if _orderly_exit is not None:
            _orderly_exit()
        sys.stdout.flush()
        sys.stderr.flush()
        if self.comm is not None and self.size > 1:
            self.comm.Abort(code)
        raise SystemExit(code)


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
    try:
        if device_error:
            raise UserError(device_error)
        world.device = early_device if early_device is not None and info.local_rank == early.local_rank \
            else select_device(info, device)
        check_slurm_size(info)
        error = None
    except UserError as e:
        error = str(e)
    error = world.agree(error)
    if error:
        raise UserError(error)
    return world


def allreduce_mean_(tensors: list, comm, count: int) -> None:
    """Sum ``tensors`` over ``comm`` in place (one flat buffer, one Allreduce), then divide by count."""
    import torch
    from mpi4py import MPI

    if comm is None or comm.Get_size() == 1 or not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1).to("cpu", torch.float32) for t in tensors]).numpy()
    comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
    if count != 1:
        flat /= count
    offset = 0
    buf = torch.from_numpy(flat)
    for t in tensors:
        k = t.numel()
        t.copy_(buf[offset:offset + k].view_as(t))
        offset += k


def allreduce_grads_(params: list, comm, count: int = 1) -> None:
    """Sum gradients over ``comm`` (divide by ``count``); missing gradients count as zeros."""
    import torch

    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    allreduce_mean_(grads, comm, count)


_orderly_exit = None  # tells this rank's watcher that the exit is deliberate

_DEATH_WATCH = r"""
import os, sys
rank, pid, host, marker = sys.argv[1:5]
said = sys.stdin.buffer.read()  # end of file when the rank exits, however it exits
if said.endswith(b"ok"):
    sys.exit(0)
msg = (f"hpcdd: rank {rank} (pid {pid} on {host}) died without a Python error: killed by a signal "
       f"(SIGKILL, or the out-of-memory killer); the launcher ends the other ranks")
try:
    fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
except FileNotFoundError:
    fd = None
except OSError:
    sys.exit(0)  # a failure was already reported (this rank was ended by the launcher's clean-up)
if fd is not None:
    os.write(fd, (msg + "\n").encode())
    os.close(fd)
print(msg, file=sys.stderr, flush=True)
"""


def failure_marker(run_dir: str) -> str:
    return os.path.join(run_dir, "FAILED")


def start_death_watch(rank: int, run_dir: str) -> None:
    """A tiny watcher process per rank that names the rank if it dies without a Python error.

    Started before MPI initialises (no fork after MPI_Init). The rank says "ok" on every orderly
    exit; a SIGKILL (or the OOM killer) closes the pipe without it. The first report creates
    RUN/FAILED, so ranks the launcher kills afterwards stay silent.
    """
    import atexit
    import platform
    import subprocess

    read, write = os.pipe()
    try:
        subprocess.Popen([sys.executable, "-S", "-c", _DEATH_WATCH, str(rank), str(os.getpid()), platform.node(),
                          failure_marker(os.path.abspath(run_dir))], stdin=read, start_new_session=True)
    except OSError:
        os.close(write)
        return
    finally:
        os.close(read)

    def orderly():
        try:
            os.write(write, b"ok")
            os.close(write)
        except OSError:
            pass

    global _orderly_exit
    _orderly_exit = orderly
    atexit.register(orderly)


def report_failure(world: World | None, exc: BaseException) -> None:
    """Print the traceback on this rank, naming it, then abort the whole job."""
    rank = world.rank if world is not None else 0
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    message = f"hpcdd: rank {rank} failed with {type(exc).__name__}: {exc}"
    print(f"{message}\n{text}", file=sys.stderr, flush=True)
    if world is not None:
        world.abort(1, message)
    raise SystemExit(1)


def user_error_exit(world: World | None, message: str, collective: bool) -> None:
    """One line on stderr (from the lowest rank), exit status 2; abort if the ranks did not agree."""
    if world is None or world.size == 1 or collective:
        if world is None or world.is_root:
            print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR)
    print(f"error: rank {world.rank}: {message}", file=sys.stderr, flush=True)
    world.abort(EXIT_USER_ERROR, f"error: rank {world.rank}: {message}")


def gather_rows(world: World, rows: np.ndarray, root: int = 0) -> np.ndarray | None:
    """Gatherv of float32 rows ``(k_r, ...)`` from every rank into ``(sum k_r, ...)`` at root."""
    from mpi4py import MPI

    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if world.comm is None or world.size == 1:
        return rows
    counts = np.asarray(world.comm.allgather(rows.size), dtype=np.int64)
    tail = rows.shape[1:]
    out = np.empty(int(counts.sum()), dtype=np.float32) if world.rank == root else None
    displs = np.concatenate([[0], np.cumsum(counts)[:-1]])
    world.comm.Gatherv(rows.reshape(-1), [out, counts, displs, MPI.FLOAT] if world.rank == root else None,
                       root=root)
    if world.rank != root:
        return None
    return out.reshape((-1,) + tuple(tail))


def bcast_array(world: World, array: np.ndarray | None, root: int = 0) -> np.ndarray:
    """Bcast a float32 array whose shape only root knows."""
    if world.comm is None or world.size == 1:
        return array
    shape = world.comm.bcast(array.shape if world.rank == root else None, root=root)
    buf = np.ascontiguousarray(array, dtype=np.float32) if world.rank == root else np.empty(shape, np.float32)
    world.comm.Bcast(buf, root=root)
    return buf
