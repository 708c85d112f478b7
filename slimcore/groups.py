"""Coupled channel groups of a lifted model, and their BatchNorm scaling factors.

Torch-Pruning's ``DependencyGraph`` finds which channels must go together (residual adds, concatenation,
depthwise convs, flatten→linear). Everything on top of it is ours: which groups are prunable, which γ
rank each channel, and the index tensors that let importance be computed in one gather per BN instead
of Python loops per step.

Choices made here (documented for users in the README):
- A group is prunable only if at least one BatchNorm sees its channels (no γ, nothing to rank).
- Groups that touch a grouped, non-depthwise convolution are left whole: TP 1.6.1 slices such convs'
  input channels naively (``keep[:len//groups]``), which silently corrupts them.
- The output layer (the last conv/linear before the graph output) and modules matching
  ``prune.ignore`` globs are never pruned, nor is any group that contains them.
- A channel coupled to several BNs (a residual stream) is ranked by the largest of its |γ|: it is
  only removed when every BN that sees it says it is unimportant. The group-level form
  (``method.group``) uses the mean instead, as Torch-Pruning's group reduction does.
"""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch_pruning as tp
from torch import nn

from .errors import NothingToPrune

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
IN_CHANNEL_FNS = (tp.prune_conv_in_channels, tp.prune_linear_in_channels)


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
    graph: tp.DependencyGraph
    groups: list[ChannelGroup]
    skipped: dict[str, str]  # root layer → why it is not prunable
    output_layers: list[str]
    ignore: list[str] = field(default_factory=list)
    unprunable: dict[str, str] = field(default_factory=dict)

    def to(self, device: torch.device) -> GroupSet:
        for g in self.groups:
            for b in g.bns:
                b.bn_idx, b.root_idx = b.bn_idx.to(device), b.root_idx.to(device)
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


def build_groups(model: fx.GraphModule, example: torch.Tensor, ignore: list[str],
                 unprunable: dict[str, str] | None = None) -> GroupSet:
    """Trace dependencies and collect prunable groups; raises if the model has no BatchNorm at all.

    ``unprunable`` (module path → reason) comes from the importer: layers whose channels cross an op
    channel indices cannot be mapped through (a channel shuffle); every group containing one stays whole.
    """
    unprunable = unprunable or {}
    names = {m: n for n, m in model.named_modules()}
    if not any(isinstance(m, BN_TYPES) for m in model.modules()):
        raise NothingToPrune(
            "the model has no BatchNorm layers: network slimming ranks channels by BatchNorm γ, so there is "
            "nothing to rank (ONNX files with BatchNorm folded into Conv need the ONNX importer)")
    outs = output_layers(model)
    ignored = [model.get_submodule(n) for n in outs]
    for n, m in model.named_modules():
        if isinstance(m, CONV_TYPES + (nn.Linear,)) and any(
                fnmatch.fnmatchcase(public_name(n), pat) for pat in ignore):
            ignored.append(m)
    was_training = model.training
    model.eval()  # TP runs a forward: keep BN running statistics untouched
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
        raw = list(dg.get_all_groups(ignored_layers=ignored, root_module_types=CONV_TYPES + (nn.Linear,)))
    model.train(was_training)
    groups: list[ChannelGroup] = []
    skipped: dict[str, str] = {}
    for g in raw:
        root = g[0].dep.target.module
        rname = public_name(names.get(root, "?"))
        bns: list[BNView] = []
        layers: list[str] = []
        why = ""
        for item in g.items:
            mod, fn = item.dep.target.module, item.dep.handler
            if isinstance(mod, CONV_TYPES) and 1 < mod.groups < mod.in_channels and not (
                    mod.groups == mod.in_channels == mod.out_channels):
                why = f"coupled to grouped convolution {public_name(names.get(mod, '?'))} (groups={mod.groups})"
            if isinstance(mod, BN_TYPES) and dg.is_out_channel_pruning_fn(fn):
                bns.append(BNView(public_name(names[mod]), mod, torch.tensor(item.idxs, dtype=torch.long),
                                  torch.tensor(item.root_idxs, dtype=torch.long)))
            elif dg.is_out_channel_pruning_fn(fn) and isinstance(mod, CONV_TYPES + (nn.Linear,)):
                layers.append(public_name(names.get(mod, "?")))
        for lay in layers:
            for path, reason in unprunable.items():
                if public_name(path) == lay and not why:
                    why = reason
        if not why and not bns:
            why = "no BatchNorm sees these channels"
        if why:
            skipped[rname] = why
            continue
        groups.append(ChannelGroup(len(groups), rname, root, len(g[0].idxs), _dedupe(bns), layers))
    if not groups:
        detail = "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:5]) or "no conv/linear groups found"
        raise NothingToPrune(f"no prunable channel group in the model ({detail})")
    return GroupSet(dg, groups, skipped, [public_name(o) for o in outs], list(ignore), dict(unprunable))


def _dedupe(bns: list[BNView]) -> list[BNView]:
    seen: dict[int, BNView] = {}
    for b in bns:
        seen.setdefault(id(b.module), b)
    return list(seen.values())


def all_bns(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [(public_name(n), m) for n, m in model.named_modules() if isinstance(m, BN_TYPES)]
