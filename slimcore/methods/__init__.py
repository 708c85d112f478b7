"""Sparsity methods: how γ is pushed toward zero during sparse training.

One signature for every method: a factory ``(MethodSpec, MethodContext) -> Method``. The trainer calls
``after_backward()`` once gradients are final and unscaled (so AMP loss scaling cannot shrink the
penalty, the Torch-Pruning pitfall in FINDINGS), then the optimizer step, then ``after_step(lr)`` for
proximal updates. ``reduce`` says how coupled |γ| combine into one importance per channel.

Lifecycle around sparse training (every hook has a no-op default, so ``l1`` needs none of them):
``prepare(model)`` once before it (re-parametrise or rescale γ, keeping the function), the optimizer
built from ``param_groups(model)`` (ISTA keeps momentum and weight decay off γ), the per-step hooks,
then ``finalize(model)`` once after it, which leaves plain BatchNorms whose |γ| is the importance, so
planning, pruning and export need nothing method-specific. ``importance_of``/``channel_importance``
give the importance during training too (receding's γ is sigmoid(weight) until ``finalize``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..groups import GroupSet
from ..registry import Registry
from ..spec import MethodSpec


@dataclass
class MethodContext:
    model: nn.Module
    groups: GroupSet
    bns: list[nn.modules.batchnorm._BatchNorm]
    # An input batch (the pipeline's ``example``): ISTA measures feature-map sizes from it, and prepare()
    # reports how much its rewrite changed the outputs. Optional: without it ISTA measures on the first
    # training forward.
    example: Any = None  # one input batch, a tensor or a tuple (slimcore.io.Inputs)


class Method:
    """Base: no penalty. Subclasses override the hooks they need."""

    reduce = "max"
    strength: float = 0.0
    near_zero: float = 1e-2  # importance below this counts as "sparse" in sparsity()
    # True when the method drives importances to exact zeros (ISTA): the strength pilot then counts only
    # those, instead of importances under a tenth of the starting median.
    exact_zeros: bool = False
    # Whether a run whose strength the controller steered is cut on importance relative to each layer (the
    # scale the controller steers; slimcore.prune.plan) or on the one global scale: receding's bounded
    # importances share one (0, 1) scale.
    steered_cut_within_layer: bool = True

    def prepare(self, model: nn.Module) -> None:
        """Once, before the sparse-training optimizer is built (and before loading a resumed state)."""
        return None

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: every parameter once; per-group overrides for method needs."""
        return [{"params": list(model.parameters())}]

    def after_backward(self) -> None:
        return None

    def after_step(self, lr: float) -> None:
        return None

    def finalize(self, model: nn.Module) -> None:
        """Once, after sparse training: leave plain BatchNorms whose |γ| is the channel importance."""
        return None

    def importance_of(self, bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
        """Per-channel importance of one BN (|γ| unless the method re-parametrises γ)."""
        return bn.weight.detach().abs().float()

    @torch.no_grad()
    def channel_importance(self, groups: GroupSet) -> torch.Tensor:
        """Every prunable channel's importance (``reduce`` over coupled BNs), groups concatenated.

        Same as ``ChannelGroup.importance`` but through ``importance_of``, so it is right mid-training. All
        groups at once through one flat index (``_util.flat_index``, kept while the groups keep their sizes):
        a handful of kernels instead of a few per BN view of every group. The strength controller calls this
        about a hundred times a run, right after a training step, when each small op costs 80–200 µs on CPU.
        """
        from ._util import flat_index

        # the same GroupSet object (held, so no other takes its id) with the same sizes and BatchNorms
        key = (tuple(g.size for g in groups.groups), tuple(id(b.module) for g in groups.groups for b in g.bns))
        cached = getattr(self, "_flat", None)
        if cached is None or cached[0] is not groups or cached[1] != key:
            ix = flat_index(groups)
            cnt = torch.zeros(ix.n_channels).index_add_(0, ix.gch, torch.ones(ix.gch.numel()))
            cached = self._flat = (groups, key, ix, cnt.clamp_min(1))
        _, _, ix, cnt = cached
        if not ix.bns:
            return torch.zeros(ix.n_channels)
        flat = torch.cat([self.importance_of(bn).reshape(-1) for bn in ix.bns])
        ix = ix.to(flat.device)
        v = flat[ix.pos]
        if self.reduce == "mean":
            out = flat.new_zeros(ix.n_channels).index_add_(0, ix.gch, v) / cnt.to(flat.device)
        else:
            out = flat.new_zeros(ix.n_channels).scatter_reduce_(0, ix.gch, v, reduce="amax")
        return out.cpu()

    def sparsity(self, groups: GroupSet, threshold: float | None = None) -> float:
        """Fraction of prunable channels whose importance is below ``threshold`` (default ``near_zero``).

        One host sync: call it once per epoch (SparsityPlateau, the strength pilot), not per step.
        """
        imp = self.channel_importance(groups)
        return float((imp < (self.near_zero if threshold is None else threshold)).float().mean())

    def steered_start(self) -> float:
        """The strength a steered run starts from (called after ``prepare``): the method's own default, low,
        since a strength too high at the start wrecks a network before the guard can say so."""
        return self.strength

    def describe(self) -> dict[str, object]:
        return {"strength": self.strength, "reduce": self.reduce}


MethodFactory = Callable[[MethodSpec, MethodContext], Method]
METHODS: Registry[MethodFactory] = Registry("method")

from . import group_lasso, ista, l1, polarization, receding  # noqa: E402,F401  (register themselves)
from .pilot import PILOT_RANGES, SparsityPlateau, pilot_strength  # noqa: E402,F401
from .polarization import first_valley_threshold  # noqa: E402,F401
