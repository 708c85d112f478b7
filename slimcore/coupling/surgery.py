"""Removing channel components from a model: every module, constant and graph literal the analysis
recorded shrinks at once, from one keep-mask per record.

One pass, not one pass per group as Torch-Pruning does: nothing is re-traced between groups, so concat
offsets cannot drift, and a grouped conv loses whole groups (``groups`` shrinks with them). Split sizes
and slice bounds along the channel dim become literals of the pruned counts, which also retires any
run-time size arithmetic that assumed the old layout (``chunk`` halves that are no longer equal).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from .analyze import Coupling
from .core import BN_TYPES, CONV_TYPES, Record


def keep_mask(cp: Coupling, rec: Record, removed: np.ndarray) -> np.ndarray:
    """Per position of the record's dim (atoms × rep): True where the channel stays."""
    keep = ~removed[cp.label[rec.atoms]]
    return np.repeat(keep, rec.rep) if rec.rep > 1 else keep


def removed_labels(cp: Coupling, labels: list[int] | np.ndarray) -> np.ndarray:
    out = np.zeros(cp.n_atoms, dtype=bool)
    if len(labels):
        out[np.asarray(labels, dtype=np.int64)] = True
    return out


@torch.no_grad()
def prune(model: nn.Module, cp: Coupling, labels: list[int] | np.ndarray,
          before_module: Any = None) -> None:
    """Remove the components ``labels``. ``before_module(mod, keep_in)`` runs before a consuming layer
    loses input columns (bias compensation)."""
    removed = removed_labels(cp, labels)
    mods = dict(model.named_modules())
    ins: dict[str, np.ndarray] = {}
    outs: dict[str, np.ndarray] = {}
    for rec in cp.records:
        keep = keep_mask(cp, rec, removed)
        if keep.all():
            continue
        if rec.kind == "in":
            ins[rec.name] = keep
        elif rec.kind == "out":
            outs[rec.name] = keep
        elif rec.kind == "bn":
            _bn(mods[rec.name], keep)
        elif rec.kind == "const":
            _const(model, rec.name, rec.extra["dim"], keep)
        elif rec.kind in ("split", "slice"):
            _literal(model, rec, keep)
    for name, keep in ins.items():
        mod = mods[name]
        if before_module is not None and not (isinstance(mod, CONV_TYPES) and mod.groups > 1):
            before_module(mod, keep)
    for name in set(ins) | set(outs):
        mod = mods[name]
        ki, ko = ins.get(name), outs.get(name)
        if isinstance(mod, CONV_TYPES):
            _conv(mod, ki, ko)
        elif isinstance(mod, nn.Linear):
            _linear(mod, ki, ko)
    if isinstance(model, fx.GraphModule) and cp.editable:
        model.graph.eliminate_dead_code()
        model.recompile()


def _t(keep: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.nonzero(keep)[0], dtype=torch.long, device=device)


def _param(mod: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(mod, name)
    if isinstance(old, nn.Parameter):
        setattr(mod, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))
    else:
        setattr(mod, name, value.contiguous())


def _conv(mod: nn.Module, ki: np.ndarray | None, ko: np.ndarray | None) -> None:
    w, g = mod.weight, mod.groups
    ki = np.ones(mod.in_channels, bool) if ki is None else ki
    ko = np.ones(mod.out_channels, bool) if ko is None else ko
    if g > 1:  # whole groups only: the analysis tied each input block to its output block
        bi, bo = ki.reshape(g, -1), ko.reshape(g, -1)
        kept = bi.all(1)
        if not (np.array_equal(kept, bi.any(1)) and np.array_equal(kept, bo.all(1))
                and np.array_equal(kept, bo.any(1))):
            raise RuntimeError(f"grouped convolution would lose part of a group (groups={g})")
        mod.groups = int(kept.sum())
    else:
        _param(mod, "weight", w[:, _t(ki, w.device)])
    _param(mod, "weight", mod.weight[_t(ko, w.device)])
    if mod.bias is not None:
        _param(mod, "bias", mod.bias[_t(ko, w.device)])
    mod.in_channels, mod.out_channels = int(ki.sum()), int(ko.sum())


def _linear(mod: nn.Linear, ki: np.ndarray | None, ko: np.ndarray | None) -> None:
    w = mod.weight
    if ko is not None:
        _param(mod, "weight", w[_t(ko, w.device)])
        if mod.bias is not None:
            _param(mod, "bias", mod.bias[_t(ko, w.device)])
        mod.out_features = int(ko.sum())
    if ki is not None:
        _param(mod, "weight", mod.weight[:, _t(ki, w.device)])
        mod.in_features = int(ki.sum())


def _bn(mod: nn.Module, keep: np.ndarray) -> None:
    if not isinstance(mod, BN_TYPES):
        raise RuntimeError(f"expected a BatchNorm, found {type(mod).__name__}")
    idx = _t(keep, mod.weight.device if mod.weight is not None else torch.device("cpu"))
    for n in ("weight", "bias", "running_mean", "running_var"):
        v = getattr(mod, n, None)
        if v is not None:
            _param(mod, n, v[idx])
    mod.num_features = int(keep.sum())


def _const(model: nn.Module, target: str, dim: int, keep: np.ndarray) -> None:
    *path, leaf = target.split(".")
    owner = model.get_submodule(".".join(path)) if path else model
    t = getattr(owner, leaf)
    new = t.index_select(dim, _t(keep, t.device))
    if isinstance(t, nn.Parameter):
        setattr(owner, leaf, nn.Parameter(new, requires_grad=t.requires_grad))
    elif leaf in owner._buffers:
        owner._buffers[leaf] = new
    else:
        setattr(owner, leaf, new)


def _literal(model: nn.Module, rec: Record, keep: np.ndarray) -> None:
    node = next(n for n in model.graph.nodes if n.name == rec.name)
    if rec.kind == "split":
        bounds = np.cumsum([0] + rec.extra["sizes"])
        sizes = [int(keep[bounds[i]:bounds[i + 1]].sum()) for i in range(len(rec.extra["sizes"]))]
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        node.target = torch.ops.aten.split_with_sizes
        node.args, node.kwargs = (node.args[0], sizes, dim), {}
    else:
        start = int(keep[:rec.extra["start"]].sum())
        end = int(keep[:rec.extra["end"]].sum())
        args = list(node.args) + [None] * max(0, 5 - len(node.args))
        args[2], args[3] = start, end
        args[4] = 1 if args[4] is None else args[4]
        node.args, node.kwargs = tuple(args[:5]), {}
