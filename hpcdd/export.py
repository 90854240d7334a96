"""``RUN/model.pt``: the exported CNN-DNN, written at the end of a run and read by ``hpcdd.predict``.

One file holds everything prediction needs (architecture, decomposition, normalisation, classes,
weights of the N local CNNs and the DNN) as plain dicts and tensors, so
``torch.load(weights_only=True)`` reads it without hpcdd's classes.
"""

from __future__ import annotations

import os

from . import __version__, atomic
from .config import ModelConfig
from .decomposition import Decomposition
from .errors import UserError

MODEL_FORMAT = "hpcdd-cnn-dnn"
MODEL_VERSION = 1


def choose(rows: list) -> dict | None:
    """The CNN-DNN row with the best validation accuracy (the first such row on a tie)."""
    options = [r for r in rows if r.get("cnn_dnn")]
    return max(options, key=lambda r: r["val"]) if options else None


def write(ctx, rows: list) -> dict | None:
    """Export the best CNN-DNN on validation; returns its row (None when no CNN-DNN was trained)."""
    row = choose(rows)
    if row is None:
        return None
    local_path, dnn_path = ctx.layout.cnn_dnn(row["cnn_dnn"])
    m, cfg = ctx.manifest, ctx.cfg
    meta = {
        "format": MODEL_FORMAT, "version": MODEL_VERSION, "tool": f"hpcdd {__version__}", "method": row["method"],
        "val_accuracy": row["val"], "test_accuracy": row["test"],
        "classes": list(m.classes), "image_shape": list(m.image_shape), "grid": list(m.grid),
        "overlap": m.overlap, "boxes": [[list(a) for a in box] for box in m.boxes], "mean": list(m.mean),
        "std": list(m.std), "scale": m.scale, "dtype": m.dtype, "prep_id": m.prep_id,
        "model": {"family": cfg.model.family, "widths": list(cfg.model.widths),
                  "convs_per_block": cfg.model.convs_per_block, "hidden": cfg.model.hidden,
                  "dropout": cfg.model.dropout, "width_scale": ctx.models.width_scale},
        "dnn": {"hidden": list(cfg.dnn.hidden), "dropout": cfg.dnn.dropout, "input": cfg.dnn.input},
    }
    local = {f"sub_{i:03d}": atomic.load(local_path(i))["model"] for i in range(m.n)}
    atomic.save({"meta": meta, "local": local, "dnn": atomic.load(dnn_path)["model"]}, ctx.layout.model)
    return row


def read(path: str):
    """(CoherentModel in eval mode, meta) from a model.pt or a run directory; a UserError if it is not one."""
    from .aggregators import DNN
    from .coherent import CoherentModel
    from .models import build_model

    if os.path.isdir(path):
        path = os.path.join(path, "model.pt")
    if not os.path.exists(path):
        raise UserError(f"{path}: missing; the report phase writes it at the end of a run")
    saved = atomic.load(path)
    meta = saved.get("meta", {}) if isinstance(saved, dict) else {}
    if meta.get("format") != MODEL_FORMAT or meta.get("version") != MODEL_VERSION:
        raise UserError(f"{path}: not an hpcdd CNN-DNN model (format {meta.get('format')!r})")
    m = meta["model"]
    spec = ModelConfig(m["family"], list(m["widths"]), m["convs_per_block"], m["hidden"], m["dropout"])
    k, c = len(meta["classes"]), meta["image_shape"][0]
    locals_ = []
    try:
        deco = Decomposition(meta["image_shape"][1:], meta["grid"], meta["overlap"])
        for i in range(deco.n):
            model = build_model(spec, c, deco.subimage_shape(i), k, m["width_scale"])
            model.load_state_dict(saved["local"][f"sub_{i:03d}"])
            locals_.append(model)
        dnn = DNN(deco.n, k, tuple(meta["dnn"]["hidden"]), meta["dnn"]["dropout"])
        dnn.load_state_dict(saved["dnn"])
    except (KeyError, RuntimeError) as e:
        raise UserError(f"{path}: weights do not match the architecture it describes ({str(e).splitlines()[0][:160]})") from None
    return CoherentModel(locals_, dnn, meta["dnn"]["input"]).eval(), meta
