"""Under mpiexec -n P: one distributed coherent step equals the same step computed in one process
(same loss, same updated parameters), and one data-parallel global step equals the same minibatch
computed in one process (its P slices accumulated).

With P = R*N ranks each subdomain has R replicas, each computing a slice of the minibatch with
batch normalisation over its slice (as DDP without SyncBN); the reference therefore runs every
local CNN slice by slice, R slices, with the same dropout seeds, and the DNN on the whole batch.
"""

import sys

import numpy as np
import torch
import torch.nn.functional as F

from hpcdd.coherent import CoherentModel, DistributedCoherent, dnn_view
from hpcdd.config import build_config
from hpcdd.factory import DataCache, Models
from hpcdd.fused import shape_groups
from hpcdd.manifest import load_manifest
from hpcdd.parallel.ownership import slice_rows
from hpcdd.parallel.world import init_world
from hpcdd.training.engine import make_optimizer
from hpcdd.training.fit import train_step
from hpcdd.training.rng import TAG_COHERENT, TAG_DNN, seed_torch, stream_of

data, optimizer = sys.argv[1], sys.argv[2]
world = init_world(device="cpu", threads=1)


def abort_all(kind, value, tb):
    """A failed check on one rank ends every rank (the others would wait in the next collective)."""
    sys.__excepthook__(kind, value, tb)
    sys.stderr.flush()
    world.comm.Abort(1)


sys.excepthook = abort_all
manifest = load_manifest(data)
n = manifest.n
own = world.set_ownership(n)
cfg = build_config({}, {"data": data, "out": "unused", "model.dropout": "0.3", "dnn.dropout": "0.2",
                        "coherent.scratch.optimizer": optimizer, "coherent.scratch.lr": "0.05",
                        "global.optimizer": optimizer})
models = Models(cfg.model, cfg.dnn, manifest, cfg.seed)
data_of = DataCache(manifest, 4.0)
t = cfg.coherent.scratch
stream = stream_of(cfg.seed, "coherent scratch")
rows = stream.batches(0, manifest.count("train"), 64)[0]
counters = stream.step_counters(0, 0)
mine = rows[slice_rows(len(rows), own.replicas, own.replica)]
y = data_of(own.subdomains[0], "train").y[torch.from_numpy(rows)]
TOL = dict(rtol=1e-4, atol=1e-5)
# Adam's first step is lr * g / (|g| + eps): where g is near 0 the float-sum order of g (fused or not, a
# slice or the whole) shows in the update. Measured on one CPU: 5.6e-5 on one weight of 640, lr 0.05;
# a real mismatch (a wrong slice, a wrong scale) moves weights by about lr. Tolerance: 0.2 % of lr.
STEP_TOL = dict(rtol=1e-4, atol=2e-3 * t.lr) if optimizer == "adam" else TOL

# distributed: this rank's local CNNs only, on its replica's slice; one after another, and fused
# where they share a subimage shape (performance.fuse_local = "on")
xs = {i: data_of(i, "train").batch(mine)[0] for i in own.subdomains}
variants = []
for groups in ([[i] for i in own.subdomains], shape_groups(models, list(own.subdomains), "on", "cpu", own.replicas)):
    dist = DistributedCoherent(world, {tuple(g): models.group(g) for g in groups}, models.dnn(), n, "probs")
    opt = make_optimizer(list(dist.parameters()), t)
    loss, out = dist.step(xs, y, len(rows), opt, counters)
    variants.append((groups, dist, loss, out))

# reference: the whole CNN-DNN in this process, each local CNN run on the R replica slices in turn
ref = CoherentModel([models.local(i) for i in range(n)], models.dnn(), "probs")
ref_opt = make_optimizer(list(ref.parameters()), t)
outs = []
for i in range(n):
    parts = []
    for r in range(own.replicas):
        seed_torch(*counters, TAG_COHERENT, i)
        part = rows[slice_rows(len(rows), own.replicas, r)]
        parts.append(dnn_view(ref.local_models[i](data_of(i, "train").batch(part)[0]), "probs"))
    outs.append(torch.cat(parts))
seed_torch(*counters, TAG_DNN)
ref_out = ref.dnn(torch.stack(outs, dim=1))
ref_loss = F.cross_entropy(ref_out, y)
ref_opt.zero_grad()
ref_loss.backward()
ref_opt.step()

start = models.local(own.subdomains[0])
for groups, dist, loss, out in variants:
    assert abs(float(loss) - float(ref_loss)) < 1e-5, (groups, float(loss), float(ref_loss))
    np.testing.assert_allclose(out.numpy(), ref_out.detach().numpy(), rtol=1e-5, atol=1e-6)
    trained = dist.local_state_dicts()
    for i in own.subdomains:
        for name, q in ref.local_models[i].named_parameters():  # BatchNorm statistics: per replica slice
            np.testing.assert_allclose(trained[i][name].numpy(), q.detach().numpy(), err_msg=f"local {i} {name} {groups}",
                                       **STEP_TOL)
    for p, q in zip(dist.dnn.parameters(), ref.dnn.parameters()):
        np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), err_msg="dnn", **STEP_TOL)
    assert any(not torch.equal(a, trained[own.subdomains[0]][k]) for k, a in start.state_dict().items())
fused = max(len(g) for g in variants[1][0])

# data-parallel global CNN: P slices on P ranks vs the same P slices accumulated in one process
full = data_of(None, "train")
g = models.global_()
g_opt = make_optimizer(list(g.parameters()), cfg.global_)
x_mine, y_mine = full.batch(rows[slice_rows(len(rows), world.size, world.rank)])
seed_torch(cfg.seed, 99, world.rank)
train_step(g, g_opt, list(g.parameters()), x_mine, y_mine, len(rows), world.everyone)
r = models.global_()
r_opt = make_optimizer(list(r.parameters()), cfg.global_)
r_opt.zero_grad()
for part in range(world.size):
    xp, yp = full.batch(rows[slice_rows(len(rows), world.size, part)])
    seed_torch(cfg.seed, 99, part)
    (F.cross_entropy(r(xp), yp, reduction="sum") / len(rows)).backward()
r_opt.step()
for (name, p), q in zip(g.named_parameters(), r.parameters()):
    np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), err_msg=f"global {name}", **TOL)
if world.rank == 0:
    print(f"OK {world.size} ranks ({own.replicas} replica(s) per subdomain, {optimizer}): coherent loss "
          f"{float(loss):.6f} == {float(ref_loss):.6f} (also with up to {fused} local CNNs fused); global step equal")
