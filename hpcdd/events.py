"""What a run records as it goes: RUN/metrics.jsonl (the source of truth) and, when the optional
``tensorboard`` package is installed, the same numbers as TensorBoard event files under
RUN/tensorboard/ (rank 0 only: one owner per file).
"""

from __future__ import annotations

import json

import numpy as np

from . import extras

_SCALARS = ("loss", "train_acc", "val_acc", "lr", "images_per_s", "seconds", "comm_seconds")


def _summary_writer():
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter


class EventLog:
    def __init__(self, layout, enabled: bool, tensorboard: bool = True):
        self.layout = layout
        self.enabled = enabled
        self.writer = None
        if enabled and tensorboard:
            SummaryWriter = extras.load("tensorboard", _summary_writer)  # None: metrics.jsonl only
            if SummaryWriter is not None:
                self.writer = SummaryWriter(layout.tensorboard)

    def __call__(self, **fields) -> None:
        """One JSON line; epoch events also become TensorBoard scalars tagged phase/training/name."""
        if not self.enabled:
            return
        with open(self.layout.metrics, "a") as f:
            f.write(json.dumps(fields) + "\n")
        if self.writer is not None and "epoch" in fields and "phase" in fields and fields.get("event") is None:
            what = next((f"{k} {fields[k]}" for k in ("subdomain", "strategy", "model") if k in fields), "")
            prefix = "/".join(p for p in (fields["phase"], what.replace(" ", "_")) if p)
            for name in _SCALARS:
                if isinstance(fields.get(name), (int, float)):
                    self.writer.add_scalar(f"{prefix}/{name}", fields[name], fields["epoch"])
            self.writer.flush()

    def image(self, tag: str, picture: np.ndarray) -> None:
        """An (H, W, 3) uint8 picture, e.g. the decomposition drawn on a test image."""
        if self.writer is not None:
            self.writer.add_image(tag, picture, 0, dataformats="HWC")
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


_TRAINING_KEYS = ("subdomain", "strategy", "model")


def epoch_records(path: str) -> list[dict]:
    """The epoch records of a metrics.jsonl, each training's epoch once. A resumed training appends the
    epochs it trains again after its checkpoint (the file is a log, never rewritten): the last record of
    a (phase, training, epoch) is the one its results and weights hold, and earlier ones are dropped."""
    latest: dict = {}
    with open(path) as f:
        for line in f:
            e = json.loads(line)
            if "epoch" in e and "phase" in e and e.get("event") is None:
                latest[(e["phase"],) + tuple(e.get(k) for k in _TRAINING_KEYS) + (e["epoch"],)] = e
    return list(latest.values())


def decomposition_picture(image: np.ndarray, boxes, margin: int = 0) -> np.ndarray:
    """A stored sample (C, *spatial[+2 margin]) as an (H, W, 3) uint8 picture with every subdomain's
    box drawn in its own colour (the middle slice of a volume)."""
    x = image[(Ellipsis,) + tuple(slice(margin, s - margin) for s in image.shape[1:])] if margin else image
    if x.ndim == 4:
        x = x[:, x.shape[1] // 2]
    x = x.astype(np.float32)
    x = (x - x.min()) / max(float(x.max() - x.min()), 1e-9)
    rgb = np.repeat(x[:1], 3, 0) if x.shape[0] == 1 else x[:3]
    scale = max(1, 256 // max(rgb.shape[1:]))
    pic = (np.kron(rgb.transpose(1, 2, 0), np.ones((scale, scale, 1))) * 255).astype(np.uint8)
    colours = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
               (70, 240, 240), (240, 50, 230)]
    for i, box in enumerate(boxes):
        (y0, y1), (x0, x1) = [(a * scale, b * scale - 1) for a, b in box[-2:]]
        c = colours[i % len(colours)]
        pic[y0, x0:x1 + 1] = pic[y1, x0:x1 + 1] = c
        pic[y0:y1 + 1, x0] = pic[y0:y1 + 1, x1] = c
    return pic

