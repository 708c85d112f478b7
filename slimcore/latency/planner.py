"""Planning to a latency target: spend the budget along the global |γ| ranking with the latency table's
prediction, round each layer to its fast step, then time the real candidate and re-plan with the
measured error until it is within ``TOLERANCE`` (NetAdapt's measure-don't-guess, in a closed loop).

Each iteration aims the prediction at ``aim`` and finds the fewest channels (the smallest prefix of the
ranking) whose predicted latency ratio reaches it; the measured ratio then corrects the aim
multiplicatively (``aim *= wanted / measured``). A plan is judged on the mean of its readings, and the
loop stops only when a plan's mean over at least two readings is within tolerance: on a 2-vCPU machine
timing the original against itself reads 0.85–1.12, and stopping at the first reading within 5% mostly
stopped on one that noise flattered (its confirmation then read 4–8% off). The plan kept is the one whose
mean is closest to the target from below (or, when none got there, the fastest, with a warning), timed
again if it has one reading only. Planning never changes what is removed first, only how far down the
ranking it goes and how counts round.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import nn

from ..groups import GroupSet
from ..prune import Plan, Rounder, _rank, _select, _threshold, apply
from ..spec import PruneSpec
from .job import LatencyJob
from .runtime import Timing, ratio

TOLERANCE = 0.05  # relative to the wanted latency
ITERATIONS = 6  # tries before the confirmation: a bracket needs two or three to close on a 2-core machine


def _kept(gs: GroupSet, remove: dict) -> dict[int, int]:
    return {g.gid: g.size - int(remove[g.gid].numel()) if g.gid in remove else g.size for g in gs.groups}


ALIGN_FLOORS = (1, 8, 16)
ALIGN_GAIN = 0.03  # a wider floor must be measured this much faster to be chosen (noise is ~±3%)


def _timed(model: nn.Module, gs: GroupSet, remove: dict, job: LatencyJob) -> tuple[Timing, Timing]:
    """(original, candidate) for the plan ``remove``, timed interleaved: load on the machine slows both alike."""
    cand = copy.deepcopy(model)  # the analysis names modules, so it applies to the copy as it is
    apply(cand, gs, remove, calib=None)
    return job.compare(cand)


def _measure(model: nn.Module, gs: GroupSet, remove: dict, job: LatencyJob) -> float:
    b, t = _timed(model, gs, remove, job)
    return ratio(b, t)


def alignment_floor(model: nn.Module, gs: GroupSet, ranked: tuple, k: int, rounder: Rounder,
                    job: LatencyJob) -> int:
    """The alignment every layer keeps at least, measured on the whole model: the table's probes time each
    layer alone, and a runtime's layout passes can need more in the graph than alone (onnxruntime's NCHWc
    chain: a depthwise conv at 140 channels is fast alone, but a MobileNetV2 rounded to 4s ran 9% slower than
    rounded to 8s). The plan at ``k`` is timed with floors 1, 8 and 16; a wider floor keeps more channels,
    so it wins only when measured faster by ``ALIGN_GAIN``."""
    tried: dict[int, float] = {}
    seen: list[dict] = []
    for floor in ALIGN_FLOORS:
        remove = _select(gs, ranked, k, lambda gid, f=floor: max(rounder(gid), f))
        if any(_same(remove, r) for r in seen):
            continue
        seen.append(remove)
        tried[floor] = _measure(model, gs, remove, job)
    chosen = min(tried)
    for f in sorted(tried):
        if tried[f] < tried[chosen] * (1 - ALIGN_GAIN):
            chosen = f
    job.alignment = {"tried": {str(f): round(r, 4) for f, r in tried.items()}, "chosen": chosen, "at_removed": k}
    return chosen


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(bool((a[g] == b[g]).all()) if a[g].shape == b[g].shape else False for g in a)


def plan_latency(model: nn.Module, gs: GroupSet, spec: PruneSpec, reduce: str, job: LatencyJob,
                 within_layer: bool = False) -> Plan:
    """``within_layer``: the ranking :func:`slimcore.prune.plan` documents."""
    table = job.table(model, gs)
    table.probe_all()
    explicit = int(spec.round_to) if spec.round_to != "auto" else 1

    floor = 1

    def rounder(gid: int) -> int:
        return max(explicit, floor, table.group_step(gid))

    ranked = _rank(gs, reduce, spec.min_channels, within_layer)
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
    floor = alignment_floor(model, gs, ranked, fewest(wanted), rounder, job)

    def read(k: int, row: dict) -> float:
        return _try(model, gs, ranked, k, rounder, job, {**row, "predicted": round(predicted(k), 4)})

    k, readings = search(wanted, n, fewest, read)
    seen = {q: _mean(r) for q, r in readings.items()}
    met = seen[k] <= wanted * (1 + TOLERANCE)
    remove = _select(gs, ranked, k, rounder)
    p = Plan("latency", spec.amount, _threshold(ranked, k), remove)
    p.achieved = 1 - seen[k]
    job.target = {"requested_ratio": round(wanted, 4), "measured_ratio": round(seen[k], 4),
                  "tolerance": TOLERANCE, "met": met}
    if not met:
        p.warnings.append(
            f"latency target not reached on {job.settings.runtime}: asked for {wanted:.2f}x the original's latency, "
            f"the kept plan measured {seen[k]:.2f}x after {sum(map(len, readings.values()))} tries (per-layer floors "
            f"min_channels={spec.min_channels}, unprunable layers and fixed costs limit it)")
    return p


def search(wanted: float, n: int, fewest: Callable[[float], int],
           read: Callable[[int, dict], float]) -> tuple[int, dict[int, list[float]]]:
    """The closed loop on its own: ``fewest(aim)`` is the prediction's cut for a ratio, ``read(k, row)`` times
    the plan removing the first ``k`` channels of the ranking. Returns the kept cut and every plan's readings
    (the module docstring has the rules)."""
    aim, readings = wanted, {}
    k = fewest(aim)
    for i in range(ITERATIONS):
        if k in readings and not _near(readings[k], wanted):
            break
        readings.setdefault(k, []).append(read(k, {"iteration": i + 1, "aim": round(aim, 4)}))
        if _near(readings[k], wanted):
            if len(readings[k]) >= 2:
                break
            continue  # one reading within tolerance is often one that noise flattered: time the plan again
        seen = {q: _mean(r) for q, r in readings.items()}
        aim = min(max(aim * wanted / seen[k], 0.01), 1.0)
        k = _bracketed(seen, wanted)
        if k is None:  # no reading on each side of the target yet: correct the prediction's aim
            k = fewest(aim)
            if k in seen:  # the prediction is flat there (per-op overhead): halve the distance instead
                k = min(seen) // 2 if seen[min(seen)] < wanted else (max(seen) + n + 1) // 2
        elif k in seen:  # the bracket is one channel wide: nothing between to try
            break
    seen = {q: _mean(r) for q, r in readings.items()}
    ok = {q: r for q, r in seen.items() if r <= wanted * (1 + TOLERANCE)}
    k = max(ok, key=lambda q: ok[q]) if ok else min(seen, key=lambda q: seen[q])
    if len(readings) > 1 and len(readings[k]) < 2:
        # Picking the plan nearest the target among several favours one that noise flattered: the kept plan
        # is timed once more, and the mean of its readings is the one reported and judged.
        readings[k].append(read(k, {"iteration": "confirm", "aim": None}))
    return k, readings


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _near(xs: list[float], wanted: float) -> bool:
    """The plan's readings so far, averaged, within ``TOLERANCE`` of the wanted ratio."""
    return abs(_mean(xs) - wanted) <= TOLERANCE * wanted


def _bracketed(seen: dict[int, float], wanted: float) -> int | None:
    """With readings on both sides of the target, the next cut interpolated between the nearest two (in the
    measured ratio, not the prediction): latency can fall in steps the table did not foresee (an alignment
    kicking in, a layer leaving the fast path), where correcting the prediction's aim overshot and
    oscillated (EfficientNet-B0 in onnxruntime: 0.28 for a 0.5 target)."""
    slow = [k for k, r in seen.items() if r > wanted]
    fast = [k for k, r in seen.items() if r <= wanted]
    if not slow or not fast:
        return None
    lo, hi = max(slow), min(fast)
    if hi <= lo:  # noise put a smaller cut below a larger one: trust the larger cut's side
        return None
    r_lo, r_hi = seen[lo], seen[hi]
    k = lo + (hi - lo) * (r_lo - wanted) / max(r_lo - r_hi, 1e-9)
    return int(min(max(round(k), lo + 1), hi - 1)) if hi - lo > 1 else hi


def _try(model: nn.Module, gs: GroupSet, ranked: tuple, k: int, rounder: Rounder, job: LatencyJob,
         row: dict) -> float:
    """Time the plan that removes the first ``k`` of the ranking; the reading goes into the report."""
    remove = _select(gs, ranked, k, rounder)
    b, t = _timed(model, gs, remove, job)
    r = ratio(b, t)
    job.iterations.append({**row, "measured": round(r, 4),
                           "removed_channels": sum(int(v.numel()) for v in remove.values()),
                           "latency": t.as_dict(), "baseline": b.as_dict()})
    return r
