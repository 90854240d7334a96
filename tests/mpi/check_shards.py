"""Under mpiexec -n P: each rank reads only its own subdomains' shards and checks them against the
whole images (full.h5: ids, labels, and pixels cut with the manifest's box); the ranks check over
MPI that their sample ids and labels agree with rank 0's, that every subdomain is read by exactly
one first replica, and that the world (ranks, local ranks) is consistent."""

import sys

import numpy as np
from mpi4py import MPI

from hpcdd.data import ShardReader
from hpcdd.manifest import SPLITS, load_manifest
from hpcdd.parallel.world import init_world

data = sys.argv[1]
world = init_world(device="cpu", threads=1)
comm = world.comm
manifest = load_manifest(data)
own = world.set_ownership(manifest.n)
assert comm.Get_size() == world.size and world.info.local_rank is not None
locals_ = comm.allgather((world.info.local_rank, world.info.local_size))
assert sorted(r for r, _ in locals_) == list(range(world.size)), locals_  # one node: local ranks 0..P-1
deco = manifest.decomposition()
checked = 0
for split in SPLITS:
    with ShardReader(manifest, None) as full:
        fx, fy, fids = full.read(split)
    for i in own.subdomains:
        with ShardReader(manifest, i) as reader:
            reader.validate()
            x, y, ids = reader.read(split)
        assert x.shape[2:] == manifest.subimage_shape(i)
        assert np.array_equal(ids, fids) and np.array_equal(y, fy), f"rank {world.rank}: {split} shard {i} vs full.h5"
        np.testing.assert_array_equal(x, deco.cut(fx, i, manifest.margin), err_msg=f"{split} shard {i}: pixels are not box {i} of full.h5")
        checked += 1
        ref_ids, ref_y = (ids.copy(), y.copy()) if world.rank == 0 else (np.empty_like(ids), np.empty_like(y))
        comm.Bcast(ref_ids, root=0)
        comm.Bcast(ref_y, root=0)
        assert np.array_equal(ids, ref_ids) and np.array_equal(y, ref_y), f"rank {world.rank}: {split} ids differ"
assert checked == 3 * len(own.subdomains), checked
counts = np.zeros(manifest.n, dtype=np.int64)
for i in own.subdomains:
    counts[i] += 1 if own.replica == 0 else 0
comm.Allreduce(MPI.IN_PLACE, counts, op=MPI.SUM)
assert (counts == 1).all(), counts  # every subdomain read by exactly one first replica
if world.rank == 0:
    print(f"OK {world.size} ranks, subdomains per rank {[len(s) for s in own.table]}")
