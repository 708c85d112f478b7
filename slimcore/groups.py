"""Coupled channel groups of a lifted model, and their BatchNorm scaling factors.

Which channels must go together comes from our own analysis of the fx graph (:mod:`slimcore.coupling`):
residual adds, concatenation, splits and slices along channels (CSP, C2f, Res2Net, GhostNet, MixNet),
depthwise and grouped convolutions (whole groups), squeeze-excitation gates, flatten→linear. Torch-Pruning
is kept only as a cross-check in tests.

A *component* is a set of channels removed together (one channel of a residual stream in every layer
that carries it; one whole group of a grouped convolution). Components that touch exactly the same
layers, split pieces and slices form a :class:`ChannelGroup`, the unit the planner ranks and floors, so
keeping ``min_channels`` components per group keeps every layer, split piece and slice non-empty.

Choices made here (documented for users in the README):
- A group is prunable only if at least one BatchNorm sees its channels (no γ, nothing to rank).
- Channels that reach the model's outputs or come from its inputs, pass through an op the analysis does
  not follow, or belong to modules matching ``prune.ignore`` stay; the report names the reason.
- A channel coupled to several BNs (a residual stream) is ranked by the largest of its |γ|: it is
  only removed when every BN that sees it says it is unimportant. The group-level form
  (``method.group``) uses the mean instead, as Torch-Pruning's group reduction does.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from .coupling import Coupling, analyze
from .coupling.core import BN_TYPES, CONV_TYPES
from .errors import NothingToPrune


def public_name(name: str) -> str:
    """Module names as users see them: the lifter keeps modules under ``m.``."""
    return name[2:] if name.startswith("m.") else name


@dataclass
class BNView:
    """One BatchNorm's share of a group: ``gamma[bn_idx[k]]`` belongs to group channel ``root_idx[k]``."""

    name: str
    module: nn.modules.batchnorm._BatchNorm
    bn_idx: torch.Tensor
    root_idx: torch.Tensor


@dataclass
class ChannelGroup:
    gid: int
    root_name: str
    root: nn.Module
    size: int
    bns: list[BNView]
    layers: list[str] = field(default_factory=list)  # public names of modules whose out-channels shrink
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # component per channel
    weight: torch.Tensor | None = None  # BatchNorm channels each component removes (grouped convs: > 1)
    # (module, consumes?, positions) of every conv/linear the group touches, for rescaling methods
    members: list[tuple[nn.Module, bool, list[int]]] = field(default_factory=list)

    def importance(self, reduce: str = "max") -> torch.Tensor:
        """Per-channel importance in root indexing, from the coupled |γ|."""
        dev = self.bns[0].module.weight.device
        if reduce == "mean":
            acc = torch.zeros(self.size, device=dev)
            cnt = torch.zeros(self.size, device=dev)
            for b in self.bns:
                acc.index_add_(0, b.root_idx, b.module.weight.detach().abs().float()[b.bn_idx])
                cnt.index_add_(0, b.root_idx, torch.ones_like(b.root_idx, dtype=torch.float32))
            return acc / cnt.clamp_min(1)
        out = torch.zeros(self.size, device=dev)  # |γ| ≥ 0, so 0 is a neutral start for max
        for b in self.bns:
            out.scatter_reduce_(0, b.root_idx, b.module.weight.detach().abs().float()[b.bn_idx], reduce="amax")
        return out


@dataclass
class GroupSet:
    coupling: Coupling
    groups: list[ChannelGroup]
    skipped: dict[str, str]  # root layer → why it is not prunable
    output_layers: list[str]
    ignore: list[str] = field(default_factory=list)
    unprunable: dict[str, str] = field(default_factory=dict)
    coverage: dict[str, int] = field(default_factory=dict)  # BatchNorm channels: prunable / total

    def to(self, device: torch.device) -> GroupSet:
        for g in self.groups:
            for b in g.bns:
                b.bn_idx, b.root_idx = b.bn_idx.to(device), b.root_idx.to(device)
            if g.weight is not None:
                g.weight = g.weight.to(device)
        return self


def output_layers(gm: fx.GraphModule) -> list[str]:
    """The conv/linear modules whose outputs reach the graph output without another conv/linear."""
    found: list[str] = []
    out = next(n for n in gm.graph.nodes if n.op == "output")
    stack, seen = list(out.all_input_nodes), set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), CONV_TYPES + (nn.Linear,)):
            found.append(str(n.target))
            continue
        stack.extend(n.all_input_nodes)
    return found


def build_groups(model: nn.Module, example: torch.Tensor, ignore: list[str],
                 unprunable: dict[str, str] | None = None) -> GroupSet:
    """Analyse channel coupling and collect prunable groups; raises if the model has no BatchNorm at all.

    ``unprunable`` (module path → reason) comes from the importer: layers it knows must stay whole.
    """
    unprunable = unprunable or {}
    if not any(isinstance(m, BN_TYPES) for m in model.modules()):
        raise NothingToPrune(
            "the model has no BatchNorm layers: network slimming ranks channels by BatchNorm γ, so there is "
            "nothing to rank (ONNX files with BatchNorm folded into Conv need the ONNX importer)")
    gm = model if isinstance(model, fx.GraphModule) else None
    outs = output_layers(gm) if gm is not None else []
    pins = {n: f"layer {public_name(n)} is in prune.ignore" for n, m in model.named_modules()
            if isinstance(m, CONV_TYPES + (nn.Linear,)) and any(fnmatch.fnmatchcase(public_name(n), p) for p in ignore)}
    for path, why in unprunable.items():
        pins.setdefault(path, why)
    cp = analyze(model, example, pins)
    mods = dict(model.named_modules())
    groups, skipped, coverage = _collect(cp, mods)
    if not groups:
        detail = "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:5]) or "no conv/linear groups found"
        raise NothingToPrune(f"no prunable channel group in the model ({detail})")
    return GroupSet(cp, groups, skipped, [public_name(o) for o in outs], list(ignore), dict(unprunable), coverage)


def _collect(cp: Coupling, mods: dict[str, nn.Module]) -> tuple[list[ChannelGroup], dict[str, str], dict[str, int]]:
    """Components → groups of components that touch the same places (see module doc)."""
    touches: dict[int, set[tuple[str, str, int]]] = {}
    has_bn: set[int] = set()
    for rec in cp.records:
        labs = cp.label[rec.atoms]
        if rec.kind == "split":
            bounds = np.cumsum([0] + rec.extra["sizes"])
            seg = np.searchsorted(bounds, np.arange(labs.size), side="right") - 1
            keys = {(int(lb), int(sg)) for lb, sg in zip(labs.tolist(), seg.tolist(), strict=True)}
            for lb, sg in keys:
                touches.setdefault(lb, set()).add(("split", rec.name, sg))
            continue
        for lb in np.unique(labs).tolist():
            touches.setdefault(lb, set()).add((rec.kind, rec.name, 0))
        if rec.kind == "bn":
            has_bn.update(np.unique(labs).tolist())
    by_key: dict[frozenset, list[int]] = {}
    skipped: dict[str, str] = {}
    for lb, t in touches.items():
        root = _root(t)
        if lb in cp.pinned:
            if root is not None:
                skipped.setdefault(public_name(root), cp.pinned[lb])
            continue
        if lb not in has_bn:
            if root is not None:
                skipped.setdefault(public_name(root), "no BatchNorm sees these channels")
            continue
        by_key.setdefault(frozenset(t), []).append(lb)
    lab2gid = np.full(cp.n_atoms, -1, dtype=np.int64)
    lab2pos = np.zeros(cp.n_atoms, dtype=np.int64)
    groups: list[ChannelGroup] = []
    for key, labs in by_key.items():
        arr = np.array(sorted(labs), dtype=np.int64)
        lab2gid[arr] = len(groups)
        lab2pos[arr] = np.arange(arr.size)
        root = _root(key) or next(n for k, n, _ in key if k == "bn")
        layers = sorted(public_name(n) for k, n, _ in key if k == "out")
        groups.append(ChannelGroup(len(groups), public_name(root), mods[root], int(arr.size), [], layers, arr))
    total = prunable = 0
    for rec in cp.records:
        labs = cp.label[rec.atoms]
        gids = lab2gid[labs]
        if rec.kind == "bn":
            total += labs.size
            prunable += int((gids >= 0).sum())
        for gid in np.unique(gids[gids >= 0]).tolist():
            g = groups[gid]
            pos = np.nonzero(gids == gid)[0]
            roots = lab2pos[labs[pos]]
            if rec.kind == "bn":
                g.bns.append(BNView(public_name(rec.name), mods[rec.name], torch.as_tensor(pos, dtype=torch.long),
                                    torch.as_tensor(roots, dtype=torch.long)))
            elif rec.kind in ("in", "out"):
                mod = mods[rec.name]
                if rec.kind == "in" and isinstance(mod, CONV_TYPES) and mod.groups > 1:
                    continue
                cols = (pos[:, None] * rec.rep + np.arange(rec.rep)).reshape(-1) if rec.rep > 1 else pos
                g.members.append((mod, rec.kind == "in", cols.tolist()))
    for g in groups:
        w = torch.zeros(g.size)
        for b in g.bns:
            cnt = torch.zeros(g.size).index_add_(0, b.root_idx, torch.ones(b.root_idx.numel()))
            w = torch.maximum(w, cnt)
        g.weight = w.clamp_min(1)
    return groups, skipped, {"prunable": prunable, "total": total}


def _root(touch: set | frozenset) -> str | None:
    outs = sorted(n for k, n, _ in touch if k == "out")
    return outs[0] if outs else None


def all_bns(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [(public_name(n), m) for n, m in model.named_modules() if isinstance(m, BN_TYPES)]
