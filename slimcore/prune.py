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
from dataclasses import dataclass, field

import torch
from torch import nn

from .groups import CONV_TYPES, IN_CHANNEL_FNS, ChannelGroup, GroupSet
from .spec import PruneSpec


@dataclass
class Plan:
    target: str
    requested: float
    threshold: float
    remove: dict[int, torch.Tensor]  # group id → root channel indices to remove
    achieved: float = 0.0  # in the target's own unit (fraction of channels/params/FLOPs, or channels)
    warnings: list[str] = field(default_factory=list)

    @property
    def removed_channels(self) -> int:
        return int(sum(v.numel() for v in self.remove.values()))


def _floor(size: int, min_channels: int) -> int:
    return max(1, min(size, min_channels))


def _rank(gs: GroupSet, reduce: str, min_channels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All removable channels, ascending by importance: (importance, group id, root index)."""
    vals, gids, idxs = [], [], []
    for g in gs.groups:
        imp = g.importance(reduce).float().cpu()
        order = torch.argsort(imp, stable=True)[: g.size - _floor(g.size, min_channels)]
        vals.append(imp[order])
        gids.append(torch.full((order.numel(),), g.gid, dtype=torch.long))
        idxs.append(order)
    v, gi, ix = torch.cat(vals), torch.cat(gids), torch.cat(idxs)
    order = torch.argsort(v, stable=True)
    return v[order], gi[order], ix[order]


def _select(gs: GroupSet, ranked: tuple[torch.Tensor, torch.Tensor, torch.Tensor], k: int,
            round_to: int) -> dict[int, torch.Tensor]:
    v, gi, ix = ranked
    chosen: dict[int, list[int]] = {}
    for g_id, i in zip(gi[:k].tolist(), ix[:k].tolist(), strict=True):
        chosen.setdefault(g_id, []).append(i)
    out: dict[int, torch.Tensor] = {}
    by_id = {g.gid: g for g in gs.groups}
    for g_id, lst in chosen.items():
        g = by_id[g_id]
        if round_to > 1 and g.size >= round_to:
            keep = math.ceil((g.size - len(lst)) / round_to) * round_to
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


def plan(model: nn.Module, gs: GroupSet, spec: PruneSpec, reduce: str, example: torch.Tensor) -> Plan:
    ranked = _rank(gs, reduce, spec.min_channels)
    total = sum(g.size for g in gs.groups)
    n_cand = ranked[0].numel()
    warnings: list[str] = []
    if spec.target == "threshold":
        k = int((ranked[0] < spec.amount).sum())
        below = sum(int((g.importance(reduce).cpu() < spec.amount).sum()) for g in gs.groups)
        if below > k:
            warnings.append(f"{below - k} channels below the threshold {spec.amount:g} were kept by the "
                            f"per-layer floor (min_channels={spec.min_channels})")
        remove = _select(gs, ranked, k, spec.round_to)
        p = Plan("threshold", spec.amount, float(spec.amount), remove, warnings=warnings)
        p.achieved = p.removed_channels / total
        return p
    if spec.target == "channels":
        k = min(round(spec.amount * total), n_cand)
        remove = _select(gs, ranked, k, spec.round_to)
        p = Plan("channels", spec.amount, _threshold(ranked, k), remove, warnings=warnings)
        p.achieved = p.removed_channels / total
    else:
        base = cost(model, spec.target, example)
        lo, hi = 0, n_cand
        fr_hi = 1 - _cost_after(model, gs, _select(gs, ranked, hi, spec.round_to), spec.target, example) / base
        if fr_hi < spec.amount:
            lo = hi
        while lo < hi:  # smallest k whose pruned copy removes at least the asked fraction
            mid = (lo + hi) // 2
            fr = 1 - _cost_after(model, gs, _select(gs, ranked, mid, spec.round_to), spec.target, example) / base
            if fr >= spec.amount:
                hi = mid
            else:
                lo = mid + 1
        remove = _select(gs, ranked, lo, spec.round_to)
        p = Plan(spec.target, spec.amount, _threshold(ranked, lo), remove, warnings=warnings)
        p.achieved = 1 - _cost_after(model, gs, remove, spec.target, example) / base
    tol = max(1.0 / total, 0.02) if spec.target == "channels" else 0.02
    if p.achieved + tol < spec.amount:
        p.warnings.append(
            f"target not reached: asked to remove {spec.amount:.0%} of {spec.target}, removed {p.achieved:.1%} "
            f"(per-layer floors min_channels={spec.min_channels}, round_to={spec.round_to}, ignored or "
            f"unprunable layers limit it)")
    return p


def cost(model: nn.Module, unit: str, example: torch.Tensor) -> float:
    from .measure import count_flops, count_params

    return float(count_params(model) if unit == "params" else count_flops(model, example[:1]))


def _cost_after(model: nn.Module, gs: GroupSet, remove: dict[int, torch.Tensor], unit: str,
                example: torch.Tensor) -> float:
    # TP's graph holds autograd nodes and cannot be deep-copied: rebuild it on the copy, match by root name.
    from .groups import build_groups

    m2 = copy.deepcopy(model)
    gs2 = build_groups(m2, example, gs.ignore, gs.unprunable)
    by_name = {g.root_name: g.gid for g in gs2.groups}
    names = {g.gid: g.root_name for g in gs.groups}
    apply(m2, gs2, {by_name[names[k]]: v for k, v in remove.items()}, calib=None)
    return cost(m2, unit, example)


def apply(model: nn.Module, gs: GroupSet, remove: dict[int, torch.Tensor],
          calib: list[torch.Tensor] | None) -> None:
    """Prune the planned channels in place, folding their mean contribution into consumers' biases.

    ``calib`` is a list of input batches used to measure each consumer's mean input per channel; with
    None (cost estimation) nothing is compensated.
    """
    by_id: dict[int, ChannelGroup] = {g.gid: g for g in gs.groups}
    pruning = [(by_id[gid], idx) for gid, idx in sorted(remove.items()) if idx.numel()]
    # Groups are fetched again right before each prune: concat offsets shift as earlier groups shrink.
    first = [_group_of(gs, g, idx) for g, idx in pruning]
    consumers = {item.dep.target.module for pg in first for item in pg.items
                 if item.dep.handler in IN_CHANNEL_FNS and not _depthwise(item.dep.target.module)}
    means = _input_means(model, consumers, calib) if calib is not None else {}
    alive = {m: torch.arange(_in_features(m)) for m in consumers}
    for g, idx in pruning:
        pg = _group_of(gs, g, idx)
        for item in pg.items:
            mod = item.dep.target.module
            if mod not in consumers or item.dep.handler not in IN_CHANNEL_FNS:
                continue
            cur = torch.tensor(item.idxs, dtype=torch.long)
            if mod in means:
                _absorb(mod, cur, means[mod][alive[mod][cur]])
            keep = torch.ones(alive[mod].numel(), dtype=torch.bool)
            keep[cur] = False
            alive[mod] = alive[mod][keep]
        pg.prune()


def _group_of(gs: GroupSet, g: ChannelGroup, idx: torch.Tensor) -> object:
    dg = gs.graph
    return dg.get_pruning_group(g.root, dg.get_pruner_of_module(g.root).prune_out_channels, idx.tolist())


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
            model(b)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return {m: (sums[m] / counts[m]).cpu() for m in sums}
