"""Ownership: which subdomains each rank trains (blocks when P <= N, replicas when P = R*N)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError


@dataclass(frozen=True)
class Ownership:
    """Which subdomains a rank trains. P <= N: a balanced block; P = R*N: replica r of one subdomain."""

    rank: int
    size: int
    n: int
    subdomains: tuple[int, ...]
    replicas: int
    replica: int

    @property
    def table(self) -> list[tuple[int, ...]]:
        return [ownership(self.size, self.n, r).subdomains for r in range(self.size)]


def ownership(size: int, n: int, rank: int) -> Ownership:
    if size <= n:
        first, last = rank * n // size, (rank + 1) * n // size
        return Ownership(rank, size, n, tuple(range(first, last)), 1, 0)
    if size % n == 0:
        replicas = size // n
        return Ownership(rank, size, n, (rank // replicas,), replicas, rank % replicas)
    fits = sorted({p for p in range(1, n + 1)} | {n * k for k in range(2, 5)})
    raise UserError(
        f"{size} ranks fit neither rule for {n} subdomains: use at most {n} ranks (each trains a block of "
        f"subdomains) or a multiple of {n} (replicas per subdomain), e.g. -n {', '.join(map(str, fits[-4:]))}")


def slice_rows(batch: int, parts: int, part: int) -> slice:
    """The rows of a minibatch that part ``part`` of ``parts`` data-parallel workers computes."""
    return slice(part * batch // parts, (part + 1) * batch // parts)


