"""Under mpiexec -n P: each rank reads only its own subdomains' shards; the ranks check over MPI
that their sample ids and labels agree, and that the world (ranks, local ranks) is consistent."""

import sys

import numpy as np
from mpi4py import MPI

from hpcdd.data import SPLITS, ShardReader, load_manifest
from hpcdd.parallel import init_world

data = sys.argv[1]
world = init_world(device="cpu", threads=1)
comm = world.comm
manifest = load_manifest(data)
own = world.set_ownership(len(manifest["shards"]))
assert comm.Get_size() == world.size and world.info.local_rank is not None
locals_ = comm.allgather((world.info.local_rank, world.info.local_size))
assert sorted(r for r, _ in locals_) == list(range(world.size)), locals_  # one node: local ranks 0..P-1
for split in SPLITS:
    for i in own.subdomains:
        with ShardReader(data, i, manifest) as reader:
            reader.validate()
            x, y, ids = reader.read(split)
            assert x.shape[2:] == tuple(b - a for a, b in manifest["boxes"][i])
        ref_ids = np.empty_like(ids)
        ref_y = np.empty_like(y)
        if world.rank == 0:
            ref_ids[:], ref_y[:] = ids, y
        comm.Bcast(ref_ids, root=0)
        comm.Bcast(ref_y, root=0)
        assert np.array_equal(ids, ref_ids) and np.array_equal(y, ref_y), f"rank {world.rank}: {split} ids differ"
counts = np.zeros(len(manifest["shards"]), dtype=np.int64)
for i in own.subdomains:
    counts[i] += 1 if own.replica == 0 else 0
comm.Allreduce(MPI.IN_PLACE, counts, op=MPI.SUM)
assert (counts == 1).all(), counts  # every subdomain read by exactly one first replica
if world.rank == 0:
    print(f"OK {world.size} ranks, subdomains per rank {[len(s) for s in own.table]}")
