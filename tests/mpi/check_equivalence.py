"""Under mpiexec -n P: one distributed coherent step equals one step of the single-process
CNN-DNN (same loss, same updated parameters), and one data-parallel global step equals the same
minibatch computed in one process (its P slices accumulated)."""

import sys

import numpy as np
import torch
import torch.nn.functional as F

from hpcdd.coherent import CoherentModel, DistributedCoherent
from hpcdd.config import build_config
from hpcdd.data import load_manifest
from hpcdd.parallel import init_world, slice_rows
from hpcdd.phases import Context
from hpcdd.training import epoch_batches, make_optimizer, seed_step, train_step

data, optimizer = sys.argv[1], sys.argv[2]
world = init_world(device="cpu", threads=1)
manifest = load_manifest(data)
n = len(manifest["shards"])
own = world.set_ownership(n)
cfg = build_config({}, {"data": data, "out": "unused", "model.dropout": "0.3", "dnn.dropout": "0.2",
                        "coherent.scratch.optimizer": optimizer, "coherent.scratch.lr": "0.05"})
ctx = Context(cfg, world, "unused", manifest)
t = cfg.coherent.scratch
rows = epoch_batches(cfg.seed, 0, manifest["splits"]["train"], 64)[0]
seeds = (cfg.seed, 0, 0, 0)
mine = rows[slice_rows(len(rows), own.replicas, own.replica)]
y = ctx.data(own.subdomains[0], "train").y[torch.from_numpy(rows)]
TOL = dict(rtol=1e-4, atol=1e-5)  # Adam divides by |g|: float-sum order shows near g = 0

# distributed: this rank's local CNNs only
dist = DistributedCoherent(world, {i: ctx.local_model(i) for i in own.subdomains}, ctx.dnn(), n, "probs")
opt = make_optimizer(list(dist.parameters()), t)
xs = {i: ctx.data(i, "train").batch(mine)[0] for i in own.subdomains}
loss = dist.step(xs, y, len(rows), opt, seeds)

# reference: the whole CNN-DNN in this process
ref = CoherentModel([ctx.local_model(i) for i in range(n)], ctx.dnn(), "probs")
ref_opt = make_optimizer(list(ref.parameters()), t)
ref_loss = F.cross_entropy(ref([ctx.data(i, "train").batch(rows)[0] for i in range(n)], seeds=seeds), y)
ref_opt.zero_grad()
ref_loss.backward()
ref_opt.step()

assert abs(loss - float(ref_loss)) < 1e-5, (loss, float(ref_loss))
changed = 0
for i in own.subdomains:
    for (name, p), q in zip(dist.local_models[i].named_parameters(), ref.local_models[i].parameters()):
        np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), err_msg=f"local {i} {name}", **TOL)
        changed += 1
for p, q in zip(dist.dnn.parameters(), ref.dnn.parameters()):
    np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), err_msg="dnn", **TOL)
start = ctx.local_model(own.subdomains[0])
assert any(not torch.equal(a, b) for a, b in zip(start.parameters(), dist.local_models[own.subdomains[0]].parameters()))

# data-parallel global CNN: P slices on P ranks vs the same P slices accumulated in one process
full = ctx.data(None, "train")
g = ctx.global_model()
g_opt = make_optimizer(list(g.parameters()), cfg.global_)
x_mine, y_mine = full.batch(rows[slice_rows(len(rows), world.size, world.rank)])
seed_step(cfg.seed, 99, world.rank)
g_loss, _ = train_step(g, g_opt, list(g.parameters()), x_mine, y_mine, len(rows), world.comm if world.size > 1 else None)
r = ctx.global_model()
r_opt = make_optimizer(list(r.parameters()), cfg.global_)
r_opt.zero_grad()
for part in range(world.size):
    xp, yp = full.batch(rows[slice_rows(len(rows), world.size, part)])
    seed_step(cfg.seed, 99, part)
    (F.cross_entropy(r(xp), yp, reduction="sum") / len(rows)).backward()
r_opt.step()
for (name, p), q in zip(g.named_parameters(), r.parameters()):
    np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), err_msg=f"global {name}", **TOL)
if world.rank == 0:
    print(f"OK {world.size} ranks: coherent loss {loss:.6f} == {float(ref_loss):.6f}; global step equal")
