"""Shared plumbing for the sparsity methods: which γ they act on, flat index tensors, and exact rewrites.

The methods other than ``l1`` act only on the BatchNorms that rank a prunable channel group (the γ
that decide something). Shrinking, clamping or re-parametrising a γ that is never pruned would only
damage the model.

The rewrites here keep the network's function exactly, and say where they cannot:
- ``flip_negative``: a channel with γ < 0 is flipped at its producer (conv/linear weights and bias,
  the BN's running mean) so γ becomes |γ|. Exact in train and eval mode, but only when the BN's input
  comes straight from a conv/linear that feeds nothing else; elsewhere γ ← |γ| changes that channel.
- ``rescale``: γ, β ← α·γ, α·β and every consuming conv/linear input column ← ÷α. Exact when the path
  from the BN to its consumers holds only positively homogeneous channel-wise ops (ReLU, max/avg
  pooling, flatten, add/concat of equally rescaled tensors): f(αx) = α·f(x). Not exact through
  SiLU/GELU/sigmoid/ReLU6 or a bias added after the BN. Depthwise convs in a group are taken to sit
  between two BNs of the group (BN → act → depthwise → BN): their weights are divided by α.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .. import io
from ..groups import CONV_TYPES, ChannelGroup, GroupSet

BN = nn.modules.batchnorm._BatchNorm


def group_bns(gs: GroupSet) -> list[BN]:
    """Affine BatchNorms seen by at least one prunable group, each once, in a stable order."""
    seen: dict[int, BN] = {}
    for g in gs.groups:
        for b in g.bns:
            if b.module.weight is not None:
                seen.setdefault(id(b.module), b.module)
    return list(seen.values())


@dataclass
class FlatIndex:
    """Every group's BNViews concatenated once, so per-step penalties are a few kernels, no Python loops.

    ``pos[k]`` is a position in the concatenation of the BNs' γ (in ``bns`` order); ``gch[k]`` the
    matching channel in the concatenation of all groups' channels (``n_channels`` in all).
    """

    bns: list[BN]
    sizes: list[int]
    pos: torch.Tensor
    gch: torch.Tensor
    n_channels: int

    def to(self, device: torch.device) -> FlatIndex:
        if self.pos.device != device:
            self.pos, self.gch = self.pos.to(device), self.gch.to(device)
        return self


def flat_index(gs: GroupSet, bns: list[nn.Module] | None = None) -> FlatIndex:
    """Over ``bns`` (default: :func:`group_bns`); a BN in no group gets positions in the concatenation only."""
    bns = group_bns(gs) if bns is None else bns
    offset, sizes, acc = {}, [], 0
    for bn in bns:
        offset[id(bn)] = acc
        sizes.append(bn.weight.numel())
        acc += sizes[-1]
    pos, gch, goff = [], [], 0
    for g in gs.groups:
        for b in g.bns:
            if id(b.module) in offset:
                pos.append(b.bn_idx.cpu() + offset[id(b.module)])
                gch.append(b.root_idx.cpu() + goff)
        goff += g.size
    empty = torch.zeros(0, dtype=torch.long)
    return FlatIndex(bns, sizes, torch.cat(pos) if pos else empty, torch.cat(gch) if gch else empty, goff)


class SpareIndex:
    """Which γ to spare, as index tensors built once per run: the controller re-chooses the spared channels at
    every check (about a hundred a run), and a per-group ``topk`` with per-BN ``isin`` cost ~0.7 ms a check
    on the digits CNN, with one host copy of each BN's index tensors per check on CUDA.

    The choice (``masks``) is growing regularization's selective penalty (Wang et al. 2021, GReg-1): 0 on
    each group's strongest ``max(1, floor(share × size))`` channels by importance, 1 elsewhere, so a steered
    penalty acts only on the channels that are to go and leaves each layer's strong channels to train free
    of it; no layer is pushed past the wanted share (on the digits CNN, ISTA right after removing half the
    channels went from 0.88, only each layer's strongest spared, to 0.995). It follows the current
    importance, so a spared channel that weakens is penalised at the next call. Ties go to the lower index.
    """

    def __init__(self, gs: GroupSet, bns: list[nn.Module]) -> None:
        import numpy as np

        flat = flat_index(gs, bns)
        self.sizes, self.total = flat.sizes, sum(flat.sizes)
        self.gsize = np.array([g.size for g in gs.groups], dtype=np.int64)
        self.gid = np.repeat(np.arange(len(self.gsize)), self.gsize)
        self.start = np.cumsum(self.gsize) - self.gsize
        # a channel of the concatenation, and the γ (in ``bns`` order) it ranks
        self.src, self.dst = flat.gch.numpy(), flat.pos.numpy()

    def masks(self, imp: torch.Tensor, share: float) -> list[torch.Tensor]:
        """Per BN (CPU, one entry per γ): 0 where spared, 1 elsewhere (class docstring). In numpy: the
        controller calls it right after a training step, when each small torch op costs 80–200 µs."""
        import numpy as np

        a = imp.detach().float().cpu().numpy()
        keep = np.minimum(np.maximum(np.floor(self.gsize * share).astype(np.int64), 1), self.gsize)
        by_imp = np.argsort(-a, kind="stable")
        order = by_imp[np.argsort(self.gid[by_imp], kind="stable")]  # grouped, strongest first in each
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size) - self.start[self.gid[order]]
        spared = rank < keep[self.gid]
        mask = np.ones(self.total, dtype=np.float32)
        mask[self.dst[spared[self.src]]] = 0.0
        return list(torch.from_numpy(mask).split(self.sizes))


class SparesShare:
    """``spare_strongest`` for a method whose per-BN masks (``spared``, in ``bns`` order) multiply its push:
    L1, ISTA, receding, polarization. Steered runs only (the strength controller calls it at each check):
    the penalty acts on the channels that are to go, each group's strongest ``share`` is spared
    (``SpareIndex``, growing regularization's selective penalty). ``_on`` caches the method's device copies
    and is cleared here. The method's ``__init__`` calls ``_init_spares``; it has ``ctx``, ``bns`` and
    ``channel_importance``."""

    ctx: Any
    bns: list[nn.Module]

    def _init_spares(self) -> None:
        self.spared: list[torch.Tensor] | None = None  # per BN, 0 where the penalty is off
        self._spares: SpareIndex | None = None
        self._on: dict[torch.device, list[torch.Tensor]] = {}

    def spare_strongest(self, share: float = 0.0, imp: torch.Tensor | None = None) -> None:
        imp = imp if imp is not None else self.channel_importance(self.ctx.groups)  # type: ignore[attr-defined]
        if self._spares is None:  # built once: the controller calls this about a hundred times a run
            self._spares = SpareIndex(self.ctx.groups, self.bns)
        self.spared = self._spares.masks(imp, share)
        self._on.clear()


def add_to_grads(params: list[torch.Tensor], flat: torch.Tensor, sizes: list[int], alpha: float) -> None:
    """grad += alpha·flat (split back per parameter) in one fused call; parameters without grad are skipped."""
    chunks = flat.split(sizes)
    pairs = [(p.grad, c.view_as(p)) for p, c in zip(params, chunks, strict=True) if p.grad is not None]
    if pairs:
        torch._foreach_add_([g for g, _ in pairs], [c for _, c in pairs], alpha=alpha)


def group_items(gs: GroupSet, g: ChannelGroup) -> list[tuple[nn.Module, bool, list[int]]]:
    """(module, consumes?, channel indices) for every conv/linear of the group, all channels at once.

    ``consumes`` is True where the group's channels are the module's *input* columns; depthwise convs
    (channel in = channel out) are listed as producers, as Torch-Pruning does.
    """
    return list(g.members)


def depthwise(m: nn.Module) -> bool:
    return isinstance(m, CONV_TYPES) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


@torch.no_grad()
def rescale(gs: GroupSet, bns: list[BN], alpha: float, undo: bool = False) -> None:
    """γ, β ← α·γ, α·β on ``bns``; consumers' input columns (and depthwise convs) ← ÷α. See module doc.

    ``undo`` divides where the forward pass multiplied (and vice versa), so a round trip restores every
    value bit for bit when α is a power of two, and to one rounding (≤ 1 ulp) otherwise.
    """
    scale, unscale = ("div_", "mul_") if undo else ("mul_", "div_")
    for bn in bns:
        getattr(bn.weight, scale)(alpha)
        if bn.bias is not None:
            getattr(bn.bias, scale)(alpha)
    cols: dict[int, tuple[nn.Module, set[int], bool]] = {}
    ids = {id(bn) for bn in bns}
    for g in gs.groups:
        if not any(id(b.module) in ids for b in g.bns):
            continue
        for mod, consumes, idxs in group_items(gs, g):
            if consumes or depthwise(mod):
                cols.setdefault(id(mod), (mod, set(), consumes))[1].update(idxs)
    for mod, idx, consumes in cols.values():
        i = torch.tensor(sorted(idx), dtype=torch.long, device=mod.weight.device)
        w = mod.weight[:, i] if consumes else mod.weight[i]  # depthwise: output channel c reads input c
        getattr(w, unscale)(alpha)
        if consumes:
            mod.weight[:, i] = w
        else:
            mod.weight[i] = w


def producer_of(model: nn.Module, bn: BN) -> nn.Module | None:
    """The conv/linear whose output only this BN reads, found on the fx graph; None if there is none."""
    if not isinstance(model, fx.GraphModule):
        return None
    name = next((n for n, m in model.named_modules() if m is bn), None)
    for node in model.graph.nodes:
        if node.op == "call_module" and node.target == name and node.args:
            src = node.args[0]
            if isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1:
                mod = model.get_submodule(str(src.target))
                if isinstance(mod, CONV_TYPES + (nn.Linear,)):
                    return mod
    return None


@torch.no_grad()
def flip_negative(model: nn.Module, bns: list[BN]) -> int:
    """Make every γ ≥ 0 (see module doc); returns how many channels could not be flipped exactly."""
    inexact = 0
    for bn in bns:
        neg = bn.weight < 0
        if not bool(neg.any()):
            continue
        prod = producer_of(model, bn)
        if prod is not None and bn.running_mean is not None:
            sign = torch.where(neg, -1.0, 1.0).to(bn.weight)
            prod.weight.mul_(sign.view(-1, *([1] * (prod.weight.dim() - 1))).to(prod.weight))
            if prod.bias is not None:
                prod.bias.mul_(sign.to(prod.bias))
            bn.running_mean.mul_(sign.to(bn.running_mean))
        else:
            inexact += int(neg.sum())
        bn.weight.abs_()
    return inexact


@torch.no_grad()
def eval_forward(model: nn.Module, example: io.Inputs) -> object:
    """One eval-mode forward (running statistics untouched) on the model's device; any output structure."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    try:
        return io.call(model, io.apply(example, lambda t: t.to(dev)))
    finally:
        model.train(was)


@torch.no_grad()
def output_change(model: nn.Module, example: io.Inputs | None, fn: Callable[[], object]) -> float | None:
    """Run ``fn`` (a rewrite) and return the largest eval-mode output change it caused on ``example``
    (over every output)."""
    if example is None:
        fn()
        return None
    before = eval_forward(model, example)
    fn()
    return io.max_abs_diff(eval_forward(model, example), before)
