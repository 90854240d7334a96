"""The report: the paper's comparison of every method, plots, and the exported CNN-DNN.

Rank 0 reads what the phases wrote under RUN/ and writes RUN/results.json, RUN/results.md,
RUN/plots/*.png (when matplotlib is installed) and RUN/model.pt. ``hpcdd-report RUN`` does the same
from the run directory alone (and the data's manifest), in one process without MPI or a GPU.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from . import __version__, atomic, export, extras
from .cli_util import OneLineParser
from .config import config_of_run
from .data import ShardReader
from .errors import UserError, fail
from .layout import RunLayout
from .manifest import load_manifest
from .metrics import imbalanced
from .parallel.ownership import ownership
from .progress import training_flops
from .registry import table_rows
from .table import SCORES, PhaseResults


def collect(ctx, results: PhaseResults) -> dict:
    """Everything the phases measured, as one dict (the body of results.json): each phase's rows of the
    table (``hpcdd.table``) and the comparison of the decomposed pipeline with the global CNN."""
    cfg, m = ctx.cfg, ctx.manifest
    glob, agg = results.of("global"), results.of("aggregate")
    coherent = {s: results.of("coherent", s) for s in cfg.coherent.strategies}
    decomposed = results.decomposed_seconds
    speedup = (glob["wall_seconds"] / decomposed) if glob and decomposed else None
    reach = time_to_accuracy(glob, agg, coherent, decomposed) if glob else None
    efficiency = flop_efficiency(ctx, speedup) if glob and results.of("local") else {}
    return {
        "tool": f"hpcdd {__version__}",
        "dataset": m.dataset, "grid": list(m.grid), "overlap": m.overlap, "image_shape": list(m.image_shape),
        "splits": dict(m.splits), "ranks": ctx.world.size, "threads_per_rank": ctx.world.threads,
        "device": str(ctx.world.device), "model_family": cfg.model.family,
        "epochs": {"local": cfg.local.epochs, "dnn": cfg.dnn.epochs, "global": cfg.global_.epochs,
                   **{f"coherent_{s}": getattr(cfg.coherent, s).epochs for s in cfg.coherent.strategies}},
        "rows": table_rows(results),
        "test_class_counts": test_class_counts(m),
        "decomposed_seconds": decomposed,
        "global_seconds": glob["wall_seconds"] if glob else None,
        "speedup_decomposed_over_global": speedup,
        **efficiency,
        "local_subdomains": agg["local"] if agg else None,
        "time_to_accuracy": reach,
    }


REACH_MARGIN = 0.005  # time to the global CNN's best validation accuracy minus half a point


def _first_reach(history: list, target: float, wall: float) -> float | None:
    """Seconds into a training at the end of its first epoch with val_acc >= target (its wall time
    spread over the epochs as their training seconds are), None if none reached it."""
    total = sum(e["seconds"] for e in history) or 1.0
    done = 0.0
    for e in history:
        done += e["seconds"]
        if e["val_acc"] >= target - 1e-12:
            return wall * done / total
    return None


def time_to_accuracy(glob: dict, agg: dict | None, coherent: dict, decomposed: float | None) -> dict:
    """The user's number: when each decomposed method first reached the global CNN's best validation
    accuracy minus half a point, next to when the global CNN did (its own curve). Average, vote and the
    CNN-DNN exist at the end of the aggregate phase (local + aggregate wall time); coherent transfer
    starts there and adds its epochs; coherent scratch starts from nothing."""
    target = glob["val"] - REACH_MARGIN
    methods = {}
    if agg and decomposed is not None:
        for name, key in (("average probability", "average"), ("majority vote", "vote"), ("CNN-DNN", "dnn")):
            methods[name] = decomposed if agg["methods"][key]["val"] >= target - 1e-12 else None
    for strategy, res in coherent.items():
        if not res:
            continue
        name = f"coherent CNN-DNN ({strategy})"
        if strategy == "transfer":
            if decomposed is None:
                continue
            after = 0.0 if res["initial_val"] >= target - 1e-12 else _first_reach(res["history"], target,
                                                                                   res["train_seconds"])
            methods[name] = None if after is None else decomposed + after
        else:
            methods[name] = _first_reach(res["history"], target, res["train_seconds"])
    own = _first_reach(glob["history"], target, glob["wall_seconds"])
    reached = {k: v for k, v in methods.items() if v is not None}
    best = min(reached, key=reached.get) if reached else None
    return {"target_val": target, "global_seconds": own, "seconds": methods, "best": best,
            "ratio": (reached[best] / own) if best and own else None}


def test_class_counts(m) -> list[int]:
    with ShardReader(m, 0) as reader:
        return np.bincount(reader._group("test")["y"][:], minlength=m.k).tolist()


def score_columns(results: dict) -> list[tuple[str, str]]:
    """The (key, header) of the test columns beside accuracy: balanced accuracy where the test split's
    classes are imbalanced, AUC where there are two classes (hpcdd.metrics)."""
    cols = []
    has = {k for r in results["rows"] for k in SCORES if r.get(k) is not None}
    counts = results.get("test_class_counts") or []
    if "test_balanced" in has and imbalanced(counts):
        cols.append(("test_balanced", "test balanced accuracy"))
    if "test_auc" in has and len(counts) == 2:
        cols.append(("test_auc", "test AUC"))
    return cols


def flop_efficiency(ctx, measured: float | None) -> dict:
    """The paper's argument in numbers: training FLOPs per image (forward + backward) of the global CNN
    and of each local CNN; the FLOP-ideal speedup of the local phase over the global CNN on the same
    ranks (the global CNN's epochs spread over all ranks vs the busiest rank's local CNNs); and the
    measured speedup over it (efficiency). The measured side includes the aggregate phase."""
    cfg, m, own = ctx.cfg, ctx.manifest, ctx.world.own
    local = [training_flops(ctx.models.local(i), (m.channels,) + m.subimage_shape(i)) for i in range(m.n)]
    global_ = training_flops(ctx.models.global_(), (m.channels,) + tuple(m.image_shape[1:]))
    busiest = max(sum(local[i] for i in subs) / own.replicas for subs in own.table)
    ideal = (global_ * cfg.global_.epochs / ctx.world.size) / (busiest * cfg.local.epochs)
    return {"train_flops_per_image": {"global": global_, "local": local, "local_total": sum(local)},
            "flop_ideal_speedup": ideal,
            "efficiency": (measured / ideal) if measured else None}


def _fmt(v, digits=4):
    if v is None:
        return "-"
    if isinstance(v, list):
        if all(isinstance(x, int) for x in v):
            return f"{min(v):,} .. {max(v):,} each" if min(v) != max(v) else f"{v[0]:,} each"
        return " / ".join(_fmt(x, digits) for x in v)
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.{digits}f}"


def markdown(results: dict) -> str:
    r = results
    cols = score_columns(r)
    lines = [f"# hpcdd results: {r['dataset']}, grid {'x'.join(map(str, r['grid']))}, overlap {r['overlap']}",
             "",
             f"{r['ranks']} rank(s), {r['threads_per_rank']} thread(s) per rank, device {r['device']}, "
             f"model family {r['model_family']}; epochs: " + ", ".join(f"{k} {v}" for k, v in r["epochs"].items())
             + "; samples: " + ", ".join(f"{k} {v}" for k, v in r["splits"].items()) + ".",
             "",
             "| method | val accuracy | test accuracy | " + "".join(f"{h} | " for _, h in cols)
             + "parameters | training wall time (s) | time per epoch (s) | best epoch |",
             "| --- | --- | --- | " + "--- | " * len(cols) + "--- | --- | --- | --- |"]
    kept_start = []
    for row in r["rows"]:
        best = row.get("best_epoch")
        if best == 0:
            kept_start.append(row["method"])
        lines.append(f"| {row['method']} | {_fmt(row['val'])} | {_fmt(row['test'])} | "
                     + "".join(f"{_fmt(row.get(k))} | " for k, _ in cols)
                     + f"{_fmt(row['parameters'])} | {_fmt(row['train_seconds'], 1)} | "
                     f"{_fmt(row['seconds_per_epoch'], 2)} | {'-' if best is None else ('0 (start)' if best == 0 else best)} |")
    lines.append("")
    if cols:
        lines.append(f"Test split class counts {r['test_class_counts']}: "
                     + " and ".join(h for _, h in cols) + " beside accuracy (balanced accuracy: the mean of the "
                     "per-class recalls; AUC: of the probability of the second class).")
    for method in kept_start:
        lines.append(f"{method} never beat its starting point on validation: the row is the model it started from; "
                     f"its training time bought no improvement.")
    for extra, why in (r.get("skipped_extras") or {}).items():
        lines.append(f"Skipped the optional extra {extra}: installed but fails to import ({why}).")
    exported = r.get("exported_model")
    if exported:
        lines.append(f"Exported to model.pt (for hpcdd-predict): {exported['method']}, the CNN-DNN with the best "
                     f"validation accuracy ({exported['val']:.4f}).")
    reach = r.get("time_to_accuracy")
    if reach and reach["global_seconds"]:
        own = reach["global_seconds"]
        parts = [f"{m} " + ("not reached" if t is None else f"{t:.1f} s ({t / own:.2f}x)")
                 for m, t in reach["seconds"].items()]
        lines.append(f"Time to the global CNN's best validation accuracy minus 0.5 points ({reach['target_val']:.4f}): "
                     f"global CNN {reach['global_seconds']:.1f} s; " + "; ".join(parts)
                     + (f". Fastest: {reach['best']}, {reach['ratio']:.2f}x the global CNN's time." if reach["best"]
                        else ". No decomposed method reached it."))
    if r["speedup_decomposed_over_global"]:
        lines.append(f"Decomposed pipeline (local + aggregate): {r['decomposed_seconds']:.1f} s; global CNN: "
                     f"{r['global_seconds']:.1f} s; speedup {r['speedup_decomposed_over_global']:.2f}x.")
    if r.get("flop_ideal_speedup"):
        f = r["train_flops_per_image"]
        lines.append(f"Training FLOPs per image (forward + backward): global CNN {f['global'] / 1e6:.1f} M, local CNNs "
                     f"{min(f['local']) / 1e6:.2f}-{max(f['local']) / 1e6:.2f} M each ({f['local_total'] / 1e6:.1f} M "
                     f"together); FLOP-ideal speedup {r['flop_ideal_speedup']:.2f}x"
                     + (f", measured {r['speedup_decomposed_over_global']:.2f}x: efficiency {r['efficiency']:.2f}."
                        if r.get("efficiency") else "."))
    lines.append("Average probability, majority vote and CNN-DNN share the local CNNs; their time is local + "
                 "aggregate. Coherent rows count only their own phase's time (transfer starts from the trained "
                 "local CNNs and DNN). Majority-vote ties go to the class with the larger summed probability.")
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plots(ctx, results: dict, written_by: PhaseResults) -> list[str]:
    """Test accuracy per method, training curves per phase, one image with the grid drawn on it."""
    plt = extras.load("matplotlib", _pyplot)
    if plt is None:
        return []
    out = ctx.layout.plots
    os.makedirs(out, exist_ok=True)
    written = []
    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(8, 4))
    names = [r["method"] for r in rows]
    tests = [r["test"][1] if isinstance(r["test"], list) else r["test"] for r in rows]
    ax.barh(names, tests, color="tab:blue")
    for y, v in enumerate(tests):
        ax.text(v, y, f" {v:.3f}", va="center")
    low = max(0.0, min(tests) - 0.05)
    ax.set_xlim(low, min(1.0, max(tests)) + 0.25 * (min(1.0, max(tests)) - low) + 0.01)  # zoomed: the values differ in points
    ax.set_xlabel("test accuracy (local CNNs: mean); axis starts at %.2f" % low)
    ax.invert_yaxis()
    fig.tight_layout()
    written.append(_save(fig, os.path.join(out, "accuracy.png")))
    plt.close(fig)

    curves = []
    local = written_by.of("local")
    for s in (local or {}).get("subdomains", []):
        ck = ctx.layout.local_model(s["subdomain"])
        if os.path.exists(ck):
            curves.append((f"local {s['subdomain']}", atomic.load(ck)["summary"]["history"], "local"))
    for strategy in ctx.cfg.coherent.strategies:
        res = written_by.of("coherent", strategy)
        if res:
            curves.append((f"coherent {strategy}", res["history"], "coherent"))
    glob = written_by.of("global")
    if glob:
        curves.append(("global CNN", glob["history"], "global"))
    if os.path.exists(ctx.layout.metrics):
        with open(ctx.layout.metrics) as f:
            dnn = [e for e in map(json.loads, f)
                   if e.get("phase") == "aggregate" and e.get("model") == "dnn" and e.get("event") is None]
    else:
        dnn = []
    if curves:
        from matplotlib.ticker import MaxNLocator

        fig, axes = plt.subplots(1, 3 if dnn else 2, figsize=(14 if dnn else 10, 4.6))
        for label, hist, kind in curves:
            ep = [e["epoch"] for e in hist]
            style = {"local": dict(lw=0.8, alpha=0.6), "coherent": dict(lw=2), "global": dict(lw=2, ls="--")}[kind]
            axes[0].plot(ep, [e["loss"] for e in hist], label=label, **style)
            axes[1].plot(ep, [e["val_acc"] for e in hist], **style)
        axes[0].set_title("training loss")
        axes[1].set_title("validation accuracy")
        axes[0].set_ylabel("cross-entropy loss (mean over the epoch)")
        axes[1].set_ylabel("accuracy")
        if dnn:  # the coarse problem trains for many more epochs: its own panel
            ep = [e["epoch"] for e in dnn]
            axes[2].plot(ep, [e["loss"] for e in dnn], color="black", label="DNN training loss")
            axes[2].plot(ep, [e["val_acc"] for e in dnn], color="black", ls=":", label="DNN validation accuracy")
            axes[2].set_title("DNN on the local outputs")
            axes[2].set_ylabel("loss / accuracy")
        for a in axes:
            a.set_xlabel("epoch")
            a.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.legend(loc="lower center", ncol=min(len(curves), 5), fontsize=7, frameon=False)
        fig.tight_layout(rect=(0, 0.1, 1, 1))
        written.append(_save(fig, os.path.join(out, "training_curves.png")))
        plt.close(fig)

    m = ctx.manifest
    if m.full:
        with ShardReader(m, None) as reader:
            x = reader._group("test")["x"][0]
        mg = m.margin
        if mg:
            x = x[(Ellipsis,) + tuple(slice(mg, s - mg) for s in x.shape[1:])]
        if x.ndim == 4:
            x = x[:, x.shape[1] // 2]
        img = x.transpose(1, 2, 0).astype(np.float32)
        img = (img - img.min()) / max(float(img.max() - img.min()), 1e-9)
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray")
        deco = m.decomposition()
        for i, box in enumerate(m.boxes):
            (y0, y1), (x0, x1) = box[-2], box[-1]
            ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                                       color=plt.cm.tab10(i % 10), lw=1.5))
            if deco.dims == 2:
                ax.text(x0 + 0.5, y0 + 1.5, str(i), color=plt.cm.tab10(i % 10), fontsize=8)
        ax.set_title(f"{'x'.join(map(str, m.grid))} decomposition, overlap {m.overlap}")
        ax.axis("off")
        fig.tight_layout()
        written.append(_save(fig, os.path.join(out, "decomposition.png")))
        plt.close(fig)
    return written


def _save(fig, path: str) -> str:
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    return path


def write_report(ctx) -> dict:
    written_by = PhaseResults(ctx.cfg, ctx.layout)  # each phase's result.json, read once for table and plots
    results = collect(ctx, written_by)
    exported = export.write(ctx, results["rows"])
    results["exported_model"] = None if exported is None else {"path": "model.pt", "method": exported["method"],
                                                               "val": exported["val"]}
    results["plots"] = [os.path.relpath(p, ctx.layout.root) for p in plots(ctx, results, written_by)]
    results["skipped_extras"] = extras.skipped()  # after plots: matplotlib is imported there
    atomic.write_json(results, ctx.layout.results_json)
    text = markdown(results)
    atomic.write_text(text, ctx.layout.results_md)
    ctx.log(text)
    return results


@dataclass(frozen=True)
class RecordedWorld:
    """What the report needs of the world that ran: its size, threads, device and ownership, as
    ``RUN/ranks.json`` recorded them (the last start of the run)."""

    size: int
    threads: int
    device: str
    own: object  # ownership.Ownership of rank 0 (its ``table`` is every rank's)


@dataclass
class RecordedRun:
    """A finished run read back from its directory: what ``write_report`` takes from a live run."""

    cfg: object
    manifest: object
    layout: object
    world: RecordedWorld
    models: object

    def log(self, message: str) -> None:
        print(message, flush=True)


def recorded_run(run_dir: str) -> RecordedRun:
    """The run in ``run_dir``, from config.json, ranks.json and the data's manifest; a UserError
    naming the file when one is missing or not a run's."""
    from .factory import Models

    layout = RunLayout(run_dir)
    cfg = config_of_run(run_dir)
    if not os.path.isfile(layout.ranks):
        raise UserError(f"{run_dir}: no {layout.ranks}; is it a directory hpcdd-run wrote?")
    if not os.path.isdir(cfg.data):
        raise UserError(f"{layout.config}: data = {cfg.data} does not exist; the report reads its manifest.json")
    manifest = load_manifest(cfg.data)
    ranks = atomic.read_json(layout.ranks)["ranks"]
    world = RecordedWorld(len(ranks), int(ranks[0]["threads"]), ranks[0]["device"],
                          ownership(len(ranks), manifest.n, 0))
    models = Models(cfg.model, cfg.dnn, manifest, cfg.seed)
    return RecordedRun(cfg, manifest, layout, world, models)


def main(argv=None) -> int:
    """``hpcdd-report RUN``: rebuild results.json, results.md, the plots and model.pt of a run."""
    p = OneLineParser(prog="hpcdd-report", description=(
        "Rebuild RUN/results.json, RUN/results.md, RUN/plots and RUN/model.pt from what the phases wrote "
        "under RUN (one process, no MPI, no GPU); the report phase runs the same code."))
    p.add_argument("run", metavar="RUN", help="a run directory written by hpcdd-run")
    args = p.parse_args(argv)
    try:
        run = recorded_run(args.run)
        if not any(os.path.exists(run.layout.result(phase)) for phase in ("local", "global")):
            raise UserError(f"{args.run}: no phase has finished yet (no local/result.json or global/result.json)")
        write_report(run)
    except UserError as e:
        fail(str(e))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
