"""Network slimming (Liu et al. 2017): λ·sign(γ) added to every BatchNorm γ's gradient.

One fused ``torch._foreach_*`` call for all γ, no host syncs (FINDINGS: 0.17 ms per step on ResNet-50
versus 0.44 ms for Torch-Pruning's per-layer loop). β is never penalised. ``group=True`` is the
group-level form: the same penalty, but coupled channels are ranked by the mean of their |γ|.
"""

from __future__ import annotations

import torch

from ..spec import MethodSpec
from . import METHODS, Method, MethodContext
from ._util import SparesShare

DEFAULT_LAMBDA = 1e-4  # the paper's VGG value; ResNets used 1e-5


class L1(SparesShare, Method):
    def __init__(self, spec: MethodSpec, ctx: MethodContext) -> None:
        self.strength = spec.strength if spec.strength is not None else DEFAULT_LAMBDA
        self.reduce = "mean" if spec.group else "max"
        self.bns = [bn for bn in ctx.bns if bn.weight is not None and bn.weight.requires_grad]
        self.gammas = [bn.weight for bn in self.bns]
        self.ctx = ctx
        # steered runs spare each group's kept share (``SparesShare``); a γ in no prunable group keeps the
        # penalty, as with a given strength
        self._init_spares()

    def after_backward(self) -> None:
        params = [g for g in self.gammas if g.grad is not None]
        if not params:
            return
        grads = [g.grad for g in params]
        signs = torch._foreach_sign([g.detach() for g in params])
        if self.spared is not None:
            dev = params[0].device
            if dev not in self._on:
                self._on[dev] = [m.to(dev) for m in self.spared]
            on = self._on[dev]
            if len(params) != len(on):  # some γ got no gradient this step
                by_id = {id(g): m for g, m in zip(self.gammas, on, strict=True)}
                on = [by_id[id(g)] for g in params]
            torch._foreach_mul_(signs, on)
        torch._foreach_add_(grads, signs, alpha=self.strength)


@METHODS.register("l1")
def make_l1(spec: MethodSpec, ctx: MethodContext) -> Method:
    return L1(spec, ctx)
