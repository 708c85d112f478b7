"""Choosing which channels go (one global threshold) and removing them without dropping their output.

Planning ranks every channel of every prunable group on one scale (network slimming's global
percentile of |γ|), after reserving each group's floor: ``min_channels`` (and never a whole layer) are
kept by importance, so the threshold is the k-th smallest importance among the channels that may go.
``round_to`` then rounds each group's kept count up. FLOP and parameter targets search the same
ranking for the smallest k that removes the asked fraction, measured exactly on a pruned copy.

Removal: a channel whose γ is near zero still outputs a near-constant (β through the activation).
Instead of dropping it, its mean input to each consuming conv/linear layer — measured on calibration
data — is folded into that layer's bias. That is exact for a truly constant channel (except at
zero-padded borders) and the usual bias compensation otherwise.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import io
from .coupling import prune as _prune
from .groups import CONV_TYPES, GroupSet
from .spec import PruneSpec

if TYPE_CHECKING:
    from .latency.job import LatencyJob


@dataclass
class Plan:
    target: str
    requested: float
    threshold: float
    remove: dict[int, torch.Tensor]  # group id → root channel indices to remove
    achieved: float = 0.0  # in the target's own unit (fraction of channels/params/FLOPs, or channels)
    warnings: list[str] = field(default_factory=list)
    ranking: str = "global"  # or "within_layer": how channels were ranked (see plan)

    @property
    def removed_channels(self) -> int:
        return int(sum(v.numel() for v in self.remove.values()))


def _floor(size: int, min_channels: int) -> int:
    return max(1, min(size, min_channels))


def _rank(gs: GroupSet, reduce: str, min_channels: int,
          within_layer: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All removable channels, ascending by importance: (importance, group id, root index). ``within_layer``:
    importance ÷ its group's largest (see :func:`plan`)."""
    vals, gids, idxs = [], [], []
    for g in gs.groups:
        imp = g.importance(reduce).float().cpu()
        if within_layer and imp.numel() and float(imp.max()) > 0:
            imp = imp / imp.max()
        order = torch.argsort(imp, stable=True)[: g.size - _floor(g.size, min_channels)]
        vals.append(imp[order])
        gids.append(torch.full((order.numel(),), g.gid, dtype=torch.long))
        idxs.append(order)
    v, gi, ix = torch.cat(vals), torch.cat(gids), torch.cat(idxs)
    order = torch.argsort(v, stable=True)
    return v[order], gi[order], ix[order]


Rounder = Callable[[int], int]  # group id → the multiple its kept count is rounded up to


def _select(gs: GroupSet, ranked: tuple[torch.Tensor, torch.Tensor, torch.Tensor], k: int,
            round_to: int | Rounder) -> dict[int, torch.Tensor]:
    v, gi, ix = ranked
    chosen: dict[int, list[int]] = {}
    for g_id, i in zip(gi[:k].tolist(), ix[:k].tolist(), strict=True):
        chosen.setdefault(g_id, []).append(i)
    out: dict[int, torch.Tensor] = {}
    by_id = {g.gid: g for g in gs.groups}
    for g_id, lst in chosen.items():
        g = by_id[g_id]
        step = round_to(g_id) if callable(round_to) else round_to
        if step > 1 and g.size >= step and float(g.weight.max()) == 1:  # not whole conv groups
            keep = math.ceil((g.size - len(lst)) / step) * step
            lst = lst[: max(0, g.size - keep)]  # lst is ascending by importance: drop the most important
        if lst:
            out[g_id] = torch.tensor(sorted(lst), dtype=torch.long)
    return out


def _threshold(ranked: tuple[torch.Tensor, torch.Tensor, torch.Tensor], k: int) -> float:
    v = ranked[0]
    if k <= 0 or v.numel() == 0:
        return 0.0
    if k >= v.numel():
        return float(v[-1])
    return float((v[k - 1] + v[k]) / 2)


def plan(model: nn.Module, gs: GroupSet, spec: PruneSpec, reduce: str, example: torch.Tensor,
         latency: LatencyJob | None = None, within_layer: bool = False) -> Plan:
    """``latency`` (a :class:`~slimcore.latency.job.LatencyJob`) is needed for a latency target and for
    ``round_to: "auto"``: the runtime the model is timed on.

    ``within_layer`` ranks each channel by its importance relative to its group's largest instead of by
    |γ| on one global scale: what the strength controller steers (slimcore/control.py). A penalty steered on
    that scale leaves some layers' γ uniformly small (BatchNorm before a conv is scale-invariant), and a
    global |γ| cut then empties those layers: on the digits CNN at ``params: 0.9`` the global cut removed
    98.5% of FLOPs and kept 0.54 right after pruning where the within-layer cut removed 93.8% and kept 0.945
    (bench/README.md, issue 11)."""
    if spec.measures_latency() and latency is None:
        raise ValueError("a latency target or round_to 'auto' needs the job's runtime (latency=)")
    if spec.target == "latency":
        from .latency.planner import plan_latency

        return plan_latency(model, gs, spec, reduce, latency, within_layer)
    ranked = _rank(gs, reduce, spec.min_channels, within_layer)
    round_to: int | Rounder = int(spec.round_to) if spec.round_to != "auto" else _auto(model, gs, spec, ranked, latency)
    total = sum(g.size for g in gs.groups)
    total_w = float(sum(float(g.weight.sum()) for g in gs.groups))
    n_cand = ranked[0].numel()
    warnings: list[str] = []
    if spec.target == "threshold":
        k = int((ranked[0] < spec.amount).sum())
        below = sum(int((g.importance(reduce).cpu() < spec.amount).sum()) for g in gs.groups)
        if below > k:
            warnings.append(f"{below - k} channels below the threshold {spec.amount:g} were kept by the "
                            f"per-layer floor (min_channels={spec.min_channels})")
        remove = _select(gs, ranked, k, round_to)
        p = Plan("threshold", spec.amount, float(spec.amount), remove, warnings=warnings)
        p.achieved = _removed_weight(gs, remove) / total_w
        return p
    if spec.target == "channels":
        # Components of a grouped convolution remove a whole group of channels at once: count channels.
        weights = torch.cat([g.weight.cpu() for g in gs.groups])
        offsets = torch.tensor([0] + [g.size for g in gs.groups]).cumsum(0)
        assert all(g.gid == i for i, g in enumerate(gs.groups))  # gid is the group's position
        w = weights[offsets[ranked[1]] + ranked[2]] \
            if n_cand else torch.zeros(0)
        k = min(int(torch.searchsorted(torch.cumsum(w, 0), spec.amount * total_w - 0.5)) + 1, n_cand) \
            if n_cand else 0
        remove = _select(gs, ranked, k, round_to)
        p = Plan("channels", spec.amount, _threshold(ranked, k), remove, warnings=warnings)
        p.achieved = _removed_weight(gs, remove) / total_w
    else:
        base = cost(model, spec.target, example)
        lo, hi = 0, n_cand
        fr_hi = 1 - _cost_after(model, gs, _select(gs, ranked, hi, round_to), spec.target, example) / base
        if fr_hi < spec.amount:
            lo = hi
        while lo < hi:  # smallest k whose pruned copy removes at least the asked fraction
            mid = (lo + hi) // 2
            fr = 1 - _cost_after(model, gs, _select(gs, ranked, mid, round_to), spec.target, example) / base
            if fr >= spec.amount:
                hi = mid
            else:
                lo = mid + 1
        remove = _select(gs, ranked, lo, round_to)
        p = Plan(spec.target, spec.amount, _threshold(ranked, lo), remove, warnings=warnings)
        p.achieved = 1 - _cost_after(model, gs, remove, spec.target, example) / base
    tol = max(1.0 / max(total, 1), 0.02) if spec.target == "channels" else 0.02
    if p.achieved + tol < spec.amount:
        p.warnings.append(
            f"target not reached: asked to remove {spec.amount:.0%} of {spec.target}, removed {p.achieved:.1%} "
            f"(per-layer floors min_channels={spec.min_channels}, round_to={spec.round_to}, ignored or "
            f"unprunable layers limit it)")
    return p


def _auto(model: nn.Module, gs: GroupSet, spec: PruneSpec, ranked: tuple, latency: LatencyJob | None) -> Rounder:
    """``round_to: "auto"``: each group's step from the latency table, with a floor checked on the whole model
    near where this target cuts (channels: the asked share; threshold: the channels below it; FLOPs and
    parameters: the asked share of channels, a first guess the search then moves from)."""
    from .latency.planner import alignment_floor

    assert latency is not None
    steps = latency.rounder(model, gs)
    v = ranked[0]
    k = int((v < spec.amount).sum()) if spec.target == "threshold" else int(spec.amount * v.numel())
    floor = alignment_floor(model, gs, ranked, k, steps, latency)
    return lambda gid: max(steps(gid), floor)


def gs_by_id(gs: GroupSet) -> dict:
    return {g.gid: g for g in gs.groups}


def _removed_weight(gs: GroupSet, remove: dict[int, torch.Tensor]) -> float:
    by_id = gs_by_id(gs)
    return float(sum(float(by_id[gid].weight[idx].sum()) for gid, idx in remove.items() if idx.numel()))


def cost(model: nn.Module, unit: str, example: torch.Tensor) -> float:
    from .measure import count_flops, count_params

    return float(count_params(model) if unit == "params" else count_flops(model, io.rows(example, slice(0, 1))))


def _cost_after(model: nn.Module, gs: GroupSet, remove: dict[int, torch.Tensor], unit: str,
                example: torch.Tensor) -> float:
    m2 = copy.deepcopy(model)  # the analysis names modules and nodes, so it applies to the copy as it is
    apply(m2, gs, remove, calib=None)
    return cost(m2, unit, example)


def apply(model: nn.Module, gs: GroupSet, remove: dict[int, torch.Tensor],
          calib: list[torch.Tensor] | None) -> None:
    """Prune the planned channels in place, folding their mean contribution into consumers' biases.

    ``calib`` is a list of input batches used to measure each consumer's mean input per channel; with
    None (cost estimation) nothing is compensated.
    """
    by_id = {g.gid: g for g in gs.groups}
    labels = [int(x) for gid, idx in remove.items() if idx.numel()
              for x in by_id[gid].labels[idx.cpu().numpy()].tolist()]
    if not labels:
        return
    cp = gs.coupling
    hook = None
    if calib is not None:
        from .coupling.surgery import keep_mask, removed_labels

        rem = removed_labels(cp, labels)
        mods = dict(model.named_modules())
        consumers = {mods[r.name] for r in cp.records if r.kind == "in" and not keep_mask(cp, r, rem).all()
                     and not (isinstance(mods[r.name], CONV_TYPES) and mods[r.name].groups > 1)}
        means = _input_means(model, consumers, calib)

        def hook(mod: nn.Module, keep: object) -> None:
            if mod in means:
                cur = torch.as_tensor((~keep).nonzero()[0], dtype=torch.long)
                _absorb(mod, cur, means[mod][cur])

    _prune(model, cp, labels, before_module=hook)


def _depthwise(m: nn.Module) -> bool:
    return isinstance(m, CONV_TYPES) and m.groups > 1 and m.groups == m.in_channels


def _in_features(m: nn.Module) -> int:
    return int(m.in_channels if isinstance(m, CONV_TYPES) else m.in_features)


def _absorb(mod: nn.Module, cur: torch.Tensor, mean: torch.Tensor) -> None:
    """bias += W[:, removed] · mean(removed inputs), creating the bias if the layer had none."""
    w = mod.weight.detach()
    cur = cur.to(w.device)
    cols = w[:, cur].float()
    if cols.dim() > 2:
        cols = cols.flatten(2).sum(-1)
    delta = (cols @ mean.to(cols)).to(w.dtype)
    if mod.bias is None:
        mod.bias = nn.Parameter(torch.zeros(w.shape[0], device=w.device, dtype=w.dtype))
    with torch.no_grad():
        mod.bias.add_(delta)


@torch.no_grad()
def _input_means(model: nn.Module, mods: set[nn.Module], batches: list[torch.Tensor]) -> dict:
    sums: dict[nn.Module, torch.Tensor] = {}
    counts: dict[nn.Module, int] = {}

    def hook(mod: nn.Module, args: tuple) -> None:
        x = args[0].detach().float()
        if isinstance(mod, CONV_TYPES):
            s, n = x.transpose(0, 1).flatten(1).sum(1), x.numel() // x.shape[1]
        else:
            s, n = x.reshape(-1, x.shape[-1]).sum(0), x.numel() // x.shape[-1]
        sums[mod] = sums.get(mod, 0) + s
        counts[mod] = counts.get(mod, 0) + n

    handles = [m.register_forward_pre_hook(hook) for m in mods]
    was = model.training
    model.eval()
    try:
        for b in batches:
            io.call(model, b)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return {m: (sums[m] / counts[m]).cpu() for m in sums}


def removal_culprits(gs: GroupSet, p: Plan, reduce: str, top: int = 5) -> list[dict[str, object]]:
    """The layers whose removed channels were least near zero, worst first: per group with removals, the
    largest removed importance next to the group's largest kept one, and the share of the group's
    importance that went. Why: when removal costs accuracy, these are the layers to ``ignore`` or to give
    more sparse training; a channel far from zero in its own layer carried signal the next layer used."""
    rows = []
    for g in gs.groups:
        idx = p.remove.get(g.gid)
        if idx is None or not idx.numel():
            continue
        imp = g.importance(reduce).float().cpu()
        keep = torch.ones(imp.numel(), dtype=torch.bool)
        keep[idx.cpu()] = False
        gone = imp[~keep]
        kept_max = float(imp[keep].max()) if bool(keep.any()) else 0.0
        worst = float(gone.max())
        rows.append({"layer": g.root_name, "removed": int(idx.numel()), "of": int(imp.numel()),
                     "largest_removed": round(worst, 6), "largest_kept": round(kept_max, 6),
                     "relative": round(worst / kept_max, 4) if kept_max > 0 else None,
                     "importance_share_removed": round(float(gone.sum() / imp.sum().clamp_min(1e-12)), 4)})
    rows.sort(key=lambda r: -(r["relative"] if r["relative"] is not None else 1.0))
    return rows[:top]
