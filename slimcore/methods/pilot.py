"""Picking a strength when the spec gives none, and stopping sparse training once sparsity settles.

Both are pure logic over numbers the pipeline measures, so they are tested without training anything.

``pilot_strength``: the fraction of γ that ends up under the threshold grows with the strength, over
orders of magnitude, so the search is a bisection on log10(strength) inside a per-method range:
each run halves the bracket in decades (4 decades and 5 runs leave 1/8 decade, a factor of 1.33).
It stops early once a run lands within ``tol`` of the target fraction. Otherwise it returns the weakest
tried strength that reached the target (the goal is that the wanted fraction *is* under the threshold;
the weakest such costs the least accuracy), or, if none reached it, the strongest tried.

Ranges, each containing its method's paper default near the middle (decades):
- l1, group_lasso: 1e-6 … 1e-2 (network slimming's 1e-5 for ResNets, 1e-4 for VGG);
- ista: 1e-4 … 5e-2 (FINDINGS: ρ ≤ 3e-4 zeroed no channel, ρ ≥ 0.02 every channel);
- receding: 1e-5 … 1e-1 (κ = 1e-4 ResNet, 1e-3 VGG);
- polarization: 1e-6 … 1e-2 (default 1e-4).
"""

from __future__ import annotations

import math
from collections.abc import Callable

PILOT_RANGES: dict[str, tuple[float, float]] = {
    "l1": (1e-6, 1e-2),
    "group_lasso": (1e-6, 1e-2),
    "ista": (1e-4, 5e-2),
    "receding": (1e-5, 1e-1),
    "polarization": (1e-6, 1e-2),
}


def pilot_strength(method_name: str, make_run: Callable[[float], float | None], target_fraction: float,
                   candidates: int = 5, bounds: tuple[float, float] | None = None, tol: float = 0.05) -> float:
    """Log-spaced bisection for the strength whose short run puts ``target_fraction`` of γ under threshold.

    ``make_run(strength)`` trains briefly from the same starting point and returns the fraction of γ
    under the threshold, or None when that strength damaged the network (too strong: the search goes
    lower and never returns it unless every run did); it is called at most ``candidates`` times.
    ``bounds`` overrides the method's range in ``PILOT_RANGES``.
    """
    if not 0 < target_fraction <= 1:
        raise ValueError(f"target_fraction must be in (0, 1], got {target_fraction}")
    if candidates < 1:
        raise ValueError("candidates (the number of pilot runs) must be at least 1")
    lo, hi = bounds if bounds is not None else PILOT_RANGES[method_name]
    if not 0 < lo < hi:
        raise ValueError(f"bad strength range {lo}..{hi}")
    a, b = math.log10(lo), math.log10(hi)
    tried: dict[float, float] = {}
    damaged: list[float] = []
    for _ in range(candidates):
        s = 10 ** ((a + b) / 2)
        result = make_run(s)
        if result is None:
            damaged.append(s)
            b = math.log10(s)
            continue
        frac = float(result)
        tried[s] = frac
        if abs(frac - target_fraction) <= tol:
            return s
        if frac < target_fraction:
            a = math.log10(s)
        else:
            b = math.log10(s)
    if not tried:
        return min(damaged)
    reached = [s for s, f in tried.items() if f >= target_fraction - tol]
    return min(reached) if reached else max(tried)


class SparsityPlateau:
    """Early stop for sparse training: True once the sparse fraction has stopped changing.

    Feed ``update`` the fraction of γ below a small threshold (``Method.sparsity``) after each epoch.
    It says stop when the last ``patience`` epoch-to-epoch window moved by at most ``tol`` in all
    (max − min over the last ``patience + 1`` values), but only after sparsity has risen by more than
    ``tol`` above where it started: a penalty still building up (flat at 0 in the first epochs) is
    not a plateau.
    """

    def __init__(self, patience: int = 3, tol: float = 0.01) -> None:
        if patience < 1:
            raise ValueError("patience must be at least 1")
        self.patience, self.tol = patience, tol
        self.history: list[float] = []

    def update(self, fraction: float) -> bool:
        self.history.append(float(fraction))
        h = self.history
        if len(h) <= self.patience or max(h) - h[0] <= self.tol:
            return False
        window = h[-(self.patience + 1):]
        return max(window) - min(window) <= self.tol

    def reset(self) -> None:
        self.history.clear()
