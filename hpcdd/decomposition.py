"""The decomposition: a grid of subdomains over the image (2D) or volume (3D).

Subdomain ``i`` is numbered row-major over the grid, ``(ny, nx)`` in 2D and ``(nz, ny, nx)`` in 3D.
Each axis of length ``L`` is split into ``n`` parts as evenly as possible (part ``k`` is
``[k*L//n, (k+1)*L//n)``), then every part grows by ``overlap`` pixels on each *interior* side,
as in Klawonn, Lanser, Weber (2024), Fig. 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from typing import Sequence

import numpy as np

from .errors import UserError

AXIS_NAMES = {2: ("height", "width"), 3: ("depth", "height", "width")}


def parse_grid(text: str | Sequence[int], option: str = "--grid") -> tuple[int, ...]:
    """Parse ``"4x4"`` or ``"2x2x2"`` (rows x columns [x ...]) into a tuple of positive ints."""
    if isinstance(text, str):
        parts = text.lower().replace("*", "x").split("x")
        try:
            grid = tuple(int(p) for p in parts)
        except ValueError:
            raise UserError(f"{option} {text!r}: expected NYxNX (2D) or NZxNYxNX (3D), e.g. 4x4") from None
    else:
        grid = tuple(int(p) for p in text)
    if len(grid) not in (2, 3) or any(g < 1 for g in grid):
        raise UserError(f"{option} {text!r}: expected 2 or 3 positive counts, e.g. 4x4 or 2x2x2")
    return grid


def format_grid(grid: Sequence[int]) -> str:
    return "x".join(str(g) for g in grid)


@dataclass(frozen=True)
class Decomposition:
    """A grid over an image of spatial shape ``image_shape`` ((H, W) or (D, H, W))."""

    image_shape: tuple[int, ...]
    grid: tuple[int, ...]
    overlap: int = 0

    def __post_init__(self):
        object.__setattr__(self, "image_shape", tuple(int(s) for s in self.image_shape))
        object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
        object.__setattr__(self, "overlap", int(self.overlap))
        self.validate()

    def validate(self) -> None:
        """Raise a UserError naming the dimension that does not fit."""
        dims = len(self.grid)
        grid_text = format_grid(self.grid)
        if dims not in (2, 3):
            raise UserError(f"--grid {grid_text}: expected 2 (2D) or 3 (3D) counts")
        if len(self.image_shape) != dims:
            kind = "2D images" if len(self.image_shape) == 2 else "3D volumes"
            raise UserError(
                f"--grid {grid_text} has {dims} counts but the data are {kind} of size "
                f"{format_grid(self.image_shape)}: give {len(self.image_shape)} counts")
        if self.overlap < 0:
            raise UserError(f"--overlap {self.overlap}: expected a non-negative number of pixels")
        for name, length, n in zip(AXIS_NAMES[dims], self.image_shape, self.grid):
            if n > length:
                raise UserError(
                    f"--grid {grid_text}: the image {name} {length} cannot be split into {n} parts")
            smallest = length // n
            if n > 1 and self.overlap >= smallest:
                raise UserError(
                    f"--overlap {self.overlap}: must be smaller than the smallest subdomain "
                    f"{name} ({smallest} pixels of {length} split into {n})")

    @property
    def dims(self) -> int:
        return len(self.grid)

    @property
    def n(self) -> int:
        return int(np.prod(self.grid))

    def parts(self, axis: int) -> list[tuple[int, int]]:
        """Non-overlapping parts of one axis."""
        length, n = self.image_shape[axis], self.grid[axis]
        return [(k * length // n, (k + 1) * length // n) for k in range(n)]

    def coords(self, i: int) -> tuple[int, ...]:
        """Grid coordinates of subdomain ``i`` (row-major)."""
        return tuple(int(c) for c in np.unravel_index(i, self.grid))

    def box(self, i: int) -> tuple[tuple[int, int], ...]:
        """Per axis ``(start, stop)`` of subdomain ``i``, overlap included."""
        if not 0 <= i < self.n:
            raise IndexError(f"subdomain {i} outside 0..{self.n - 1}")
        box = []
        for axis, c in enumerate(self.coords(i)):
            start, stop = self.parts(axis)[c]
            if c > 0:
                start -= self.overlap
            if c < self.grid[axis] - 1:
                stop += self.overlap
            box.append((start, stop))
        return tuple(box)

    def mirror(self, i: int) -> int:
        """The subdomain whose subimage, flipped left-right, is subdomain ``i`` of the flipped image:
        (r, c) -> (r, nx-1-c) (the last axis is the width, in 2D and 3D)."""
        c = list(self.coords(i))
        c[-1] = self.grid[-1] - 1 - c[-1]
        return int(np.ravel_multi_index(c, self.grid))

    def asymmetry(self) -> str | None:
        """None when the grid is mirror-symmetric left-right (the box of (r, nx-1-c) is the mirror
        image of the box of (r, c)); otherwise the first pair that is not, in words."""
        width = self.image_shape[-1]
        for i in range(self.n):
            (start, stop), m = self.box(i)[-1], self.mirror(i)
            if self.box(m)[-1] != (width - stop, width - start):
                return (f"subdomain {i} spans columns {start}..{stop - 1} but its mirror {m} spans "
                        f"{self.box(m)[-1][0]}..{self.box(m)[-1][1] - 1} of {width}")
        return None

    def boxes(self) -> list[tuple[tuple[int, int], ...]]:
        return [self.box(i) for i in range(self.n)]

    def subimage_shape(self, i: int) -> tuple[int, ...]:
        return tuple(stop - start for start, stop in self.box(i))

    def cut(self, batch, i: int, margin: int = 0):
        """Subimage ``i`` of a batch ``(..., *image_shape)`` (numpy array or torch tensor).

        With ``margin > 0`` the batch must already be zero-padded by ``margin`` on every spatial side,
        and the box grows by ``margin`` on every side (the stored margin that shift augmentation cuts
        from).
        """
        index = [Ellipsis] + [slice(start, stop + 2 * margin) for start, stop in self.box(i)]
        return batch[tuple(index)]

    def cut_all(self, batch, margin: int = 0) -> list:
        return [self.cut(batch, i, margin) for i in range(self.n)]

    def neighbours(self, i: int) -> list[int]:
        """Subdomains sharing a face with ``i``."""
        c = self.coords(i)
        out = []
        for axis, delta in product(range(self.dims), (-1, 1)):
            d = list(c)
            d[axis] += delta
            if 0 <= d[axis] < self.grid[axis]:
                out.append(int(np.ravel_multi_index(d, self.grid)))
        return sorted(out)

    def describe(self) -> str:
        return (f"{format_grid(self.grid)} grid ({self.n} subdomains) over "
                f"{format_grid(self.image_shape)}, overlap {self.overlap}")
