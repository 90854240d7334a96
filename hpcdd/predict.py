"""``python -m hpcdd.predict RUN --data DATA --split test``: the exported CNN-DNN on full images.

One process, no MPI: it cuts the full images of ``DATA/full.h5`` into subimages itself, runs the
N local CNNs and the DNN, and prints the accuracy (and writes per-sample predictions on request).
"""

from __future__ import annotations

import csv
import io
import sys

import numpy as np

from .atomic import write_text
from .cli_util import OneLineParser, count, writable_file
from .data import ShardReader, crop, normalise
from .decomposition import Decomposition
from .errors import UserError, fail
from .export import read
from .manifest import load_manifest


def build_parser():
    p = OneLineParser(prog="hpcdd-predict", description=(
        "Evaluate the CNN-DNN exported by a run (RUN/model.pt: the CNN-DNN with the best validation accuracy) "
        "on the full images of a prepared dataset. Also: python -m hpcdd.predict."))
    p.add_argument("run", metavar="RUN", help="run directory (or a model.pt file)")
    p.add_argument("--data", required=True, help="directory written by data_prep (its full.h5 is read)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="split to evaluate (default: test)")
    p.add_argument("--batch-size", type=count(1), default=512, help="images per forward pass (default: 512)")
    p.add_argument("--output", metavar="CSV", help="write sample_id, label, prediction, probabilities (a new file)")
    p.add_argument("--force", action="store_true",
                   help="replace the --output file if it holds earlier predictions (no other file is replaced)")
    p.add_argument("--threads", type=count(0), default=0, help="torch threads (default: all cores)")
    return p


def check_compatible(meta: dict, manifest, where: str) -> None:
    if list(manifest.image_shape) != list(meta["image_shape"]):
        raise UserError(f"{where}: images are {'x'.join(map(str, manifest.image_shape))} but the model expects "
                        f"{'x'.join(map(str, meta['image_shape']))}")
    if manifest.k != len(meta["classes"]):
        raise UserError(f"{where}: {manifest.k} classes but the model was trained on {len(meta['classes'])}")
    if list(manifest.classes) != list(meta["classes"]):
        order = "in another order" if sorted(manifest.classes) == sorted(meta["classes"]) else "named differently"
        raise UserError(f"{where}: classes {order}: {_names(manifest.classes)} but the model was trained on "
                        f"{_names(meta['classes'])}; prepare the data with the model's class list")
    for c, (m, s, mm, ms) in enumerate(zip(manifest.mean, manifest.std, meta["mean"], meta["std"])):
        # pixel values in the model's units (stored value x scale): another range means other data
        if abs(m - mm) > ms or not 1 / 3 <= s / ms <= 3:
            raise UserError(f"{where}: pixel values (channel {c}: mean {m:.4g}, std {s:.4g} as {manifest.dtype} x "
                            f"{manifest.scale:.4g}) unlike the model's training data (mean {mm:.4g}, std {ms:.4g} "
                            f"as {meta['dtype']} x {meta['scale']:.4g}); prepare the data as the model's was")
    if not manifest.full:
        raise UserError(f"{where}: no full.h5 (prepared with --no-full); re-run data_prep without it")


def _names(classes) -> str:
    text = ", ".join(classes)
    return f"[{text if len(text) <= 60 else text[:57] + '...'}]"


def predict(model, meta: dict, data_dir: str, split: str, batch_size: int = 512):
    """(probabilities (n, K), labels (n,), sample ids (n,)) for a split of full images."""
    import torch

    manifest = load_manifest(data_dir)
    check_compatible(meta, manifest, data_dir)
    deco = Decomposition(meta["image_shape"][1:], meta["grid"], meta["overlap"])
    dims = deco.dims
    view = (1, -1) + (1,) * dims
    mean = torch.tensor(meta["mean"], dtype=torch.float32).view(view)
    std = torch.tensor(meta["std"], dtype=torch.float32).view(view)
    probs, labels, ids = [], [], []
    with ShardReader(manifest, None) as reader, torch.no_grad():
        reader.validate()  # as training checks it: shapes, sample ids, labels in 0..K-1
        for x, y, sid in reader.iter_chunks(split, batch_size):
            # the data's own scale: uint8 and float32 preparations of the same images give the same inputs
            x = normalise(crop(torch.from_numpy(x), manifest.margin), manifest.scale, mean, std)
            probs.append(torch.softmax(model(deco.cut_all(x)), dim=-1).numpy())
            labels.append(y)
            ids.append(sid)
    return np.concatenate(probs), np.concatenate(labels).astype(np.int64), np.concatenate(ids)


HEADER = ["sample_id", "label", "prediction"]


def check_output(path: str, force: bool, model: str, data_dir: str) -> None:
    """``--output`` may only create a file, or with --force replace predictions this tool wrote: never the
    model it reads, a file of the prepared data, or any other file of the user's."""
    import os

    writable_file("--output", path)
    target = os.path.realpath(path)
    model_file = os.path.realpath(os.path.join(model, "model.pt") if os.path.isdir(model) else model)
    if target == model_file:
        raise UserError(f"--output {path}: is the model being read; choose another file name")
    if os.path.commonpath([target, os.path.realpath(data_dir)]) == os.path.realpath(data_dir):
        raise UserError(f"--output {path}: inside the prepared data {data_dir}; write predictions elsewhere")
    if not os.path.lexists(path):
        return
    try:
        with open(path, newline="") as f:
            first = next(csv.reader(io.StringIO(f.readline())), [])
    except (OSError, UnicodeDecodeError):
        first = []
    if first[:3] != HEADER:
        raise UserError(f"--output {path}: exists and is not a predictions file of hpcdd-predict; nothing was "
                        f"written (choose another file name)")
    if not force:
        raise UserError(f"--output {path}: exists (earlier predictions); --force replaces it")


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.output:
            check_output(args.output, args.force, args.run, args.data)
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)

        model, meta = read(args.run)
        probs, y, ids = predict(model, meta, args.data, args.split, args.batch_size)
        pred = probs.argmax(1)
        acc = float((pred == y).mean())
        print(f"{meta['method']} on {args.data} {args.split}: accuracy {acc:.4f} ({int((pred == y).sum())}/{len(y)})")
        if args.output:
            text = io.StringIO(newline="")
            w = csv.writer(text)
            w.writerow(HEADER + [f"p_{c}" for c in meta["classes"]])
            for sid, label, p, row in zip(ids, y, pred, probs):
                w.writerow([int(sid), int(label), int(p)] + [f"{v:.6f}" for v in row])
            write_text(text.getvalue(), args.output)
        return 0
    except UserError as e:
        fail(str(e))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
