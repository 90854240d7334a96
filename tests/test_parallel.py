"""The world as pure functions: launchers' environments, ownership of subdomains."""

import pytest

from hpcdd.errors import UserError
from hpcdd.parallel.launcher import WorldInfo, check_slurm_size, oversubscribed, slurm_tasks_on_node, world_info
from hpcdd.parallel.ownership import ownership, slice_rows


def test_slurm_environment():
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_TASKS_PER_NODE": "4(x2)",
           "SLURM_NODEID": "1", "SLURM_CPUS_PER_TASK": "4"}
    info = world_info(env, rank=5, size=8)
    assert (info.rank, info.size, info.local_rank, info.local_size, info.launcher) == (5, 8, 1, 4, "slurm")
    assert info.cpus_per_task == 4 and info.slurm_ntasks == 8
    assert world_info(env).rank == 5  # without MPI: from the environment


def test_open_mpi_environment():
    env = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    info = world_info(env, rank=3, size=4)
    assert (info.local_rank, info.local_size, info.launcher) == (1, 2, "openmpi")


def test_mpich_hydra_environment():
    env = {"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "2", "MPI_LOCALNRANKS": "4"}
    info = world_info(env, rank=2, size=4)
    assert (info.local_rank, info.local_size, info.launcher) == (2, 4, "mpich")


def test_pmi_environment():
    env = {"PMI_RANK": "1", "PMI_LOCAL_RANK": "0", "PMI_LOCAL_SIZE": "1"}
    assert world_info(env, rank=1, size=2).launcher == "pmi"


def test_mpirun_inside_sbatch_ignores_the_batch_steps_slurm_variables():
    env = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "4", "OMPI_COMM_WORLD_RANK": "3",
           "OMPI_COMM_WORLD_LOCAL_RANK": "3", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
    info = world_info(env, rank=3, size=4)
    assert (info.launcher, info.local_rank) == ("openmpi", 3)


def test_no_launcher():
    info = world_info({}, rank=None, size=None)
    assert (info.rank, info.size, info.local_rank, info.local_size, info.launcher) == (0, 1, 0, 1, "none")
    info = world_info({}, rank=1, size=3)
    assert info.local_rank is None  # filled by an MPI shared-memory split


def test_slurm_tasks_per_node():
    assert slurm_tasks_on_node("4(x2),3", 0) == 4
    assert slurm_tasks_on_node("4(x2),3", 2) == 3
    assert slurm_tasks_on_node("2", 0) == 2


def test_wrong_mpi_plugin_is_named():
    info = WorldInfo(0, 1, 0, 1, "slurm", slurm_ntasks=4)
    with pytest.raises(UserError, match="srun --mpi=pmi2"):
        check_slurm_size(info)
    check_slurm_size(WorldInfo(0, 4, 0, 4, "slurm", slurm_ntasks=4))


@pytest.mark.parametrize("size,n", [(1, 4), (2, 4), (3, 4), (4, 4), (3, 16), (8, 4), (12, 4), (16, 16)])
def test_ownership_covers_every_subdomain(size, n):
    owners = [ownership(size, n, r) for r in range(size)]
    covered = [i for o in owners if o.replica == 0 for i in o.subdomains]
    assert sorted(covered) == list(range(n))
    sizes = [len(o.subdomains) for o in owners]
    assert max(sizes) - min(sizes) <= 1
    if size > n:
        assert all(o.replicas == size // n for o in owners)
        assert sorted(o.replica for o in owners if o.subdomains == (0,)) == list(range(size // n))


def test_ownership_refuses_other_counts():
    with pytest.raises(UserError, match="5 ranks fit neither rule for 4 subdomains"):
        ownership(5, 4, 0)


def test_slice_rows_partition():
    rows = [slice_rows(10, 3, p) for p in range(3)]
    assert [(s.start, s.stop) for s in rows] == [(0, 3), (3, 6), (6, 10)]


def test_oversubscribed_node():
    four = WorldInfo(0, 4, 0, 4, "mpich", None, None)
    assert oversubscribed(four, (2, 2))  # 4 ranks on 2 cores
    assert not oversubscribed(four, (8, 8))
    assert not oversubscribed(four, (1, 2))  # bound by the launcher to its own core
    assert not oversubscribed(WorldInfo(0, 4, 0, 4, "slurm", 4, 1), (2, 2))  # SLURM's cpus-per-task
