"""Polarization (Zhuang et al. 2020): λ·Σ_i (t|γ_i| − |γ_i − γ̄|) over all prunable γ, γ clamped to [0, 1].

The first term pushes every γ to 0, the second pushes γ away from their mean, so with t > 1 the γ
split into a cluster at 0 and one away from it, and the threshold sits at the first valley of the |γ|
histogram (``first_valley_threshold``). γ̄ is the mean over every prunable γ of the network.

Gradient (exactly what autograd gives for the penalty, with sign(0) = 0)::

    ∂/∂γ_j = λ·( t·sign(γ_j) − sign(γ_j − γ̄) + (1/n)·Σ_i sign(γ_i − γ̄) )

one ``cat``, a few elementwise kernels and one fused ``_foreach_add_``; after the optimizer step every γ
is clamped to [0, 1] (two fused clamps). No host sync.

Initialisation: the paper initialises γ = 0.5 when training from scratch. Resetting a trained upload's
γ would throw its training away, so ``prepare`` does that only for an untrained model (every γ = 1 and
β = 0, PyTorch's init). For a trained one it brings γ into [0, 1] keeping the function: negative γ are
flipped at their producer (exact; counted when impossible), and if max γ > 1 all γ, β are divided by it
with the consumers' input columns multiplied back (``_util.rescale``: exact through ReLU, pooling,
add, concat; not through SiLU/GELU/sigmoid/ReLU6). The rescale is kept: nothing to undo at finalize.

λ default 1e-4: not from FINDINGS (it gives none); the per-γ push is λ·(t ± 1), about twice L1's 1e-4
at t = 1.2, the order of the paper's CIFAR settings. Without a spec strength the run steers λ
(slimcore/control.py) and, as for the other methods, the push then spares each layer's strongest kept
share (``SparesShare``; the mean γ̄ still counts every γ), so the run's cut is within each layer.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..spec import MethodSpec
from . import METHODS, Method, MethodContext
from ._util import SparesShare, add_to_grads, flip_negative, group_bns, output_change, rescale

DEFAULT_LAMBDA = 1e-4


def penalty(gammas: torch.Tensor, t: float) -> torch.Tensor:
    """λ-free penalty t·Σ|γ| − Σ|γ − γ̄| on a flat tensor: the reference for tests."""
    return t * gammas.abs().sum() - (gammas - gammas.mean()).abs().sum()


class Polarization(SparesShare, Method):
    def __init__(self, spec: MethodSpec, ctx: MethodContext) -> None:
        self.strength = spec.strength if spec.strength is not None else DEFAULT_LAMBDA
        self.t = float(spec.t)
        self.ctx = ctx
        self.bns = group_bns(ctx.groups)
        self.gammas = [bn.weight for bn in self.bns]
        self.sizes = [g.numel() for g in self.gammas]
        self.init = "kept"
        self.inexact_signs = 0
        self.rescaled_by = 1.0
        self.prepare_change: float | None = None
        self._init_spares()

    def prepare(self, model: nn.Module) -> None:
        if not self.bns:
            return

        @torch.no_grad()
        def run() -> None:
            if all(bool((bn.weight == 1).all()) and (bn.bias is None or bool((bn.bias == 0).all()))
                   for bn in self.bns):
                for bn in self.bns:
                    bn.weight.fill_(0.5)
                self.init = "0.5 (untrained model: the paper's init)"
                return
            self.inexact_signs = flip_negative(model, self.bns)
            top = max(float(bn.weight.max()) for bn in self.bns)
            if top > 1:
                rescale(self.ctx.groups, self.bns, 1.0 / top)
                self.rescaled_by = 1.0 / top

        self.prepare_change = output_change(model, self.ctx.example, run)

    @torch.no_grad()
    def after_backward(self) -> None:
        if not self.gammas:
            return
        flat = torch.cat([g.detach().reshape(-1) for g in self.gammas])
        away = torch.sign(flat - flat.mean())
        grad = self.t * torch.sign(flat) - away + away.mean()
        if self.spared is not None:
            if flat.device not in self._on:
                self._on[flat.device] = [torch.cat(self.spared).to(flat.device)]
            grad = grad * self._on[flat.device][0]
        add_to_grads(self.gammas, grad, self.sizes, self.strength)

    @torch.no_grad()
    def after_step(self, lr: float) -> None:
        if self.gammas:
            torch._foreach_clamp_min_(self.gammas, 0.0)
            torch._foreach_clamp_max_(self.gammas, 1.0)

    def describe(self) -> dict[str, object]:
        d: dict[str, object] = {**super().describe(), "t": self.t, "init": self.init,
                                "rescaled_by": self.rescaled_by, "inexact_sign_flips": self.inexact_signs}
        if self.prepare_change is not None:
            d["prepare_output_change"] = self.prepare_change
        return d


@METHODS.register("polarization")
def make_polarization(spec: MethodSpec, ctx: MethodContext) -> Method:
    return Polarization(spec, ctx)


def first_valley_threshold(importances: torch.Tensor, bins: int | None = None) -> float | None:
    """The importance at the first valley of the histogram (between the near-zero cluster and the rest).

    Histogram on [min(0, low), max] with ``bins`` (default 2·√n, 8 to 64) bins, smoothed by a [1, 2, 1]
    kernel. From the first peak, walk down to the first valley floor; a valley counts only if it is at
    most half as high as the peak on its left and the highest bin on its right, and at least 5% of the
    values lie right of it (so sampling noise or a few outliers in a tail make no valley), else walk on.
    The threshold is the middle of the valley floor (the middle of the empty gap for a well polarized
    histogram). None when there is no such valley (unimodal).
    """
    v = importances.detach().float().flatten().cpu()
    v = v[torch.isfinite(v)]
    if v.numel() < 4:
        return None
    lo, hi = min(0.0, float(v.min())), float(v.max())
    if hi <= lo:
        return None
    n = bins or int(min(64, max(8, round(2 * math.sqrt(v.numel())))))
    raw = torch.histc(v, n, lo, hi)
    c = torch.nn.functional.pad(raw.view(1, 1, -1), (1, 1), mode="replicate")
    c = torch.nn.functional.conv1d(c, torch.tensor([[[0.25, 0.5, 0.25]]])).flatten().tolist()
    i = 0
    while i + 1 < n and c[i + 1] >= c[i]:
        i += 1
    peak = c[i]
    while i + 1 < n:
        while i + 1 < n and c[i + 1] <= c[i]:
            i += 1
        if i + 1 >= n:
            return None
        floor_end, floor_start = i, i
        while floor_start > 0 and c[floor_start - 1] == c[i]:
            floor_start -= 1
        right = float(raw[floor_end + 1:].sum()) / v.numel()
        if c[i] <= 0.5 * min(peak, max(c[i + 1:])) and right >= 0.05:
            width = (hi - lo) / n
            return lo + width * ((floor_start + floor_end) / 2 + 0.5)
        while i + 1 < n and c[i + 1] >= c[i]:
            i += 1
        peak = max(peak, c[i])
    return None
