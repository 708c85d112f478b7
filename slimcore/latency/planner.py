"""Planning to a latency target: spend the budget along the global |γ| ranking with the latency table's
prediction, round each layer to its fast step, then time the real candidate and re-plan with the
measured error until it is within ``TOLERANCE`` (NetAdapt's measure-don't-guess, in a closed loop).

Each iteration aims the prediction at ``aim`` and finds the fewest channels (the smallest prefix of the
ranking) whose predicted latency ratio reaches it; the measured ratio then corrects the aim
multiplicatively (``aim *= wanted / measured``). The plan kept is the measured candidate closest to the
target from below (or, when none got there, the fastest, with a warning). Planning never changes what
is removed first, only how far down the ranking it goes and how counts round.
"""

from __future__ import annotations

import copy

from torch import nn

from ..groups import GroupSet
from ..prune import Plan, _rank, _select, _threshold, apply
from ..spec import PruneSpec
from .job import LatencyJob

TOLERANCE = 0.05  # relative to the wanted latency
ITERATIONS = 4


def _kept(gs: GroupSet, remove: dict) -> dict[int, int]:
    return {g.gid: g.size - int(remove[g.gid].numel()) if g.gid in remove else g.size for g in gs.groups}


def plan_latency(model: nn.Module, gs: GroupSet, spec: PruneSpec, reduce: str, job: LatencyJob) -> Plan:
    table = job.table(model, gs)
    table.probe_all()
    explicit = int(spec.round_to) if spec.round_to != "auto" else 1

    def rounder(gid: int) -> int:
        return max(explicit, table.group_step(gid))

    ranked = _rank(gs, reduce, spec.min_channels)
    n = ranked[0].numel()
    base = job.compare(model)[1]  # the sparse-trained model: same architecture as the original
    full = table.full()
    other = max(base.median_ms - full, 0.0)  # what no group touches (pooling, adds, the stem, fixed layers)

    def predicted(k: int) -> float:
        return (other + table.predict(_kept(gs, _select(gs, ranked, k, rounder)))) / (other + full)

    def fewest(aim: float) -> int:
        lo, hi = 0, n
        if predicted(hi) > aim:
            return hi
        while lo < hi:
            mid = (lo + hi) // 2
            if predicted(mid) <= aim:
                hi = mid
            else:
                lo = mid + 1
        return lo

    wanted = 1 - spec.amount
    aim, seen = wanted, {}
    for i in range(ITERATIONS):
        k = fewest(aim)
        if k in seen:
            break
        cand = copy.deepcopy(model)
        remove = _select(gs, ranked, k, rounder)
        apply(cand, gs, remove, calib=None)
        b, t = job.compare(cand)  # interleaved with the original: load on the machine slows both alike
        ratio = t.median_ms / b.median_ms
        seen[k] = ratio
        job.iterations.append({"iteration": i + 1, "aim": round(aim, 4), "predicted": round(predicted(k), 4),
                               "measured": round(ratio, 4), "removed_channels": sum(int(v.numel()) for v in
                                                                                  remove.values()),
                               "latency": t.as_dict(), "baseline": b.as_dict()})
        if abs(ratio - wanted) <= TOLERANCE * wanted:
            break
        aim = min(max(aim * wanted / ratio, 0.01), 1.0)
    ok = {k: r for k, r in seen.items() if r <= wanted * (1 + TOLERANCE)}
    k = max(ok, key=lambda q: ok[q]) if ok else min(seen, key=lambda q: seen[q])
    remove = _select(gs, ranked, k, rounder)
    p = Plan("latency", spec.amount, _threshold(ranked, k), remove)
    p.achieved = 1 - seen[k]
    job.target = {"requested_ratio": round(wanted, 4), "measured_ratio": round(seen[k], 4),
                  "tolerance": TOLERANCE, "met": bool(ok)}
    if not ok:
        p.warnings.append(
            f"latency target not reached on {job.settings.runtime}: asked for {wanted:.2f}x the original's latency, "
            f"the fastest candidate measured {seen[k]:.2f}x after {len(seen)} tries (per-layer floors "
            f"min_channels={spec.min_channels}, unprunable layers and fixed costs limit it)")
    return p
