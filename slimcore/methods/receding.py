"""Receding neuron importances (Suteu & Guo): bounded BatchNorm γ = sigmoid(w), no β, and a penalty
κ·Σ s(1 − ln s) with s = sigmoid(w + b) whose push is strongest on small γ and negligible on large ones,
so importances split into two clusters.

The bounded BN is a subclass of ``nn.BatchNorm1d/2d/3d`` whose ``weight`` holds the raw w and whose
``bias`` stays a zero, frozen parameter: Torch-Pruning still sees a BatchNorm and prunes its four
tensors. ``prepare`` changes each BN's class in place (``module.__class__``) instead of replacing the
module, so the groups, the Torch-Pruning graph and the pipeline's BN list keep pointing at it.

What the swap keeps (``to_bounded``), for a trained upload:
- negative γ are flipped at the producing conv (exact, ``_util.flip_negative``; counted when not possible);
- one global scale c = max|γ| / 0.9 maps the largest γ to s = 0.9 (still trainable: ds/dw = 0.09) and
  keeps the global ranking of |γ|; s = clamp(|γ|/c, 1e-4, 1 − 1e-4), w = logit(s);
- c and β are folded into the running statistics (σ' = σ/c, μ' = μ − β·σ'/s), so in **eval mode** the
  swapped model computes exactly what it did, except channels with |γ| < 1e-4·c (their γ becomes 1e-4·c).
- In **train mode** BatchNorm uses batch statistics, so β and c are gone from the first step on: the
  bounded BN has no shift by design, and the running statistics re-converge to the batch ones. That
  change is the method itself, not an artefact of the swap.

``finalize`` turns each bounded BN back into the plain class with weight = sigmoid(w), bias = 0: the
same function bit for bit, in train and eval mode, and |weight| is then the importance.

Defaults (FINDINGS): κ = 1e-4, b = 0 for ResNets; κ = 1e-3, b = 3 for VGG. A model counts as residual
when some group couples several BNs (a residual add); ``offset`` from the spec wins when set explicitly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..spec import MethodSpec
from . import METHODS, Method, MethodContext
from ._util import BN, SparesShare, flip_negative, group_bns, output_change

EPS = 1e-4
S_MAX = 0.9
KAPPA_RESNET, B_RESNET = 1e-4, 0.0
KAPPA_VGG, B_VGG = 1e-3, 3.0
L1_EQUIVALENT = 1e-4  # L1's default λ (methods/l1.py): the push a steered receding run starts level with
TINY = torch.finfo(torch.float32).tiny


class _Bounded(nn.modules.batchnorm._BatchNorm):
    """Mixin (listed before the concrete BatchNormNd): scale = sigmoid(weight), no shift.

    Statistics are handled exactly as torch's own ``_BatchNorm.forward`` does.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        if self.affine:
            nn.init.zeros_(self.weight)  # s = 0.5
            self.bias.requires_grad_(False)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats
        return F.batch_norm(input, self.running_mean if keep else None, self.running_var if keep else None,
                            torch.sigmoid(self.weight), None, use_batch, factor, self.eps)


class BoundedBatchNorm1d(_Bounded, nn.BatchNorm1d):
    pass


class BoundedBatchNorm2d(_Bounded, nn.BatchNorm2d):
    pass


class BoundedBatchNorm3d(_Bounded, nn.BatchNorm3d):
    pass


BOUNDED: dict[type, type] = {nn.BatchNorm1d: BoundedBatchNorm1d, nn.BatchNorm2d: BoundedBatchNorm2d,
                             nn.BatchNorm3d: BoundedBatchNorm3d}
PLAIN: dict[type, type] = {v: k for k, v in BOUNDED.items()}


@torch.no_grad()
def to_bounded(bn: BN, scale: float) -> None:
    """Plain BN (γ ≥ 0) → bounded BN in place, eval-mode function kept (see module doc)."""
    g = bn.weight.detach().double()
    s = (g / scale).clamp(EPS, 1 - EPS)
    if bn.running_var is not None and bn.running_mean is not None:
        std = (bn.running_var.double() + bn.eps).sqrt() / scale  # s/std' = c·s/std = γ_eff/std
        beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(g)
        bn.running_mean.copy_(bn.running_mean.double() - beta * std / s)
        bn.running_var.copy_(std * std - bn.eps)
    bn.weight.copy_(torch.logit(s))
    if bn.bias is not None:
        bn.bias.zero_()
        bn.bias.requires_grad_(False)
    bn.__class__ = BOUNDED[type(bn)]


@torch.no_grad()
def to_plain(bn: BN) -> None:
    """Bounded BN → plain BN with weight = sigmoid(w), bias = 0: the same function, in place."""
    bn.weight.copy_(torch.sigmoid(bn.weight))
    if bn.bias is not None:
        bn.bias.zero_()
        bn.bias.requires_grad_(True)
    bn.__class__ = PLAIN[type(bn)]


def regularizer(w: torch.Tensor, offset: float) -> torch.Tensor:
    """κ-free penalty Σ s(1 − ln s), s = sigmoid(w + b): the reference the fused gradient is tested against."""
    s = torch.sigmoid(w + offset)
    return (s * (1 - torch.log(s))).sum()


class Receding(SparesShare, Method):
    # bounded importances on one (0, 1) scale, ranked globally in the paper; measured on the digits CNN at 50%
    # of channels a within-layer cut kept 0.84 right after pruning (0.97 fine-tuned) where the global one
    # kept 0.93 (0.995)
    steered_cut_within_layer = False

    def __init__(self, spec: MethodSpec, ctx: MethodContext) -> None:
        residual = any(len(g.bns) > 1 for g in ctx.groups.groups)
        kappa, b = (KAPPA_RESNET, B_RESNET) if residual else (KAPPA_VGG, B_VGG)
        self.strength = spec.strength if spec.strength is not None else kappa
        self.offset = spec.offset if "offset" in spec.model_fields_set else b
        self.ctx = ctx
        self.bns = [bn for bn in group_bns(ctx.groups) if type(bn) in BOUNDED or type(bn) in PLAIN]
        self.scale = 1.0
        self.inexact_signs = 0
        self.prepare_change: float | None = None
        self._init_spares()  # steered runs spare each group's kept share (``SparesShare``)

    def prepare(self, model: nn.Module) -> None:
        todo = [bn for bn in self.bns if type(bn) in BOUNDED]
        if not todo:
            return

        def swap() -> None:
            self.inexact_signs = flip_negative(model, todo)
            top = max(float(bn.weight.detach().abs().max()) for bn in todo)
            self.scale = top / S_MAX if top > 0 else 1.0
            for bn in todo:
                to_bounded(bn, self.scale)

        self.prepare_change = output_change(model, self.ctx.example, swap)

    @torch.no_grad()
    def after_backward(self) -> None:
        live = [i for i, bn in enumerate(self.bns) if type(bn) in PLAIN and bn.weight.grad is not None]
        if not live:
            return
        ws = [self.bns[i].weight for i in live]
        z = torch._foreach_add([w.detach() for w in ws], self.offset)
        s = torch._foreach_sigmoid(z)
        torch._foreach_clamp_min_(s, TINY)  # log stays finite where sigmoid underflows (its term is 0 anyway)
        d = torch._foreach_log(s)  # d/dw s(1 − ln s) = −ln(s)·s·(1 − s); 1 − s as sigmoid(−z), no cancellation
        torch._foreach_mul_(d, s)
        torch._foreach_mul_(d, torch._foreach_sigmoid(torch._foreach_neg(z)))
        if self.spared is not None:
            dev = ws[0].device
            if dev not in self._on:
                self._on[dev] = [m.to(dev) for m in self.spared]
            torch._foreach_mul_(d, [self._on[dev][i] for i in live])
        torch._foreach_add_([w.grad for w in ws], d, alpha=-self.strength)

    @torch.no_grad()
    def steered_start(self) -> float:
        """κ whose push moves the median channel's importance (relative to the largest) as fast as L1's
        default λ moves a γ relative to the largest |γ|, if that is above the paper's κ.

        The paper's κ suits γ that start small (training from scratch); a trained upload's γ sit near the
        largest, where the push −ln(s)·s(1 − s) at s = sigmoid(w + b) is ~10⁻⁵ (b = 3): from κ = 10⁻³, a
        steered run reached its cap with nothing moved. Importance sigmoid(w)·scale moves by
        κ·push·sigmoid′(w)·scale per unit of lr; relative to the largest (S_MAX·scale) that is
        κ·push·sigmoid′(w)/S_MAX, against L1's λ/max|γ| = λ/(S_MAX·scale)."""
        ws = [bn.weight.detach().float().reshape(-1) for bn in self.bns if type(bn) in PLAIN]
        if not ws:
            return self.strength
        w = torch.cat(ws).median()
        s, z = torch.sigmoid(w), w + self.offset
        push = float(-F.logsigmoid(z) * torch.sigmoid(z) * torch.sigmoid(-z))
        per = push * float(s * (1 - s))
        if per <= 0:
            return self.strength
        return max(self.strength, L1_EQUIVALENT / (self.scale * per))

    def importance_of(self, bn: BN) -> torch.Tensor:
        if type(bn) in PLAIN:
            return torch.sigmoid(bn.weight.detach().float())
        return super().importance_of(bn)

    def finalize(self, model: nn.Module) -> None:
        for bn in self.bns:
            if type(bn) in PLAIN:
                to_plain(bn)

    def describe(self) -> dict[str, object]:
        d: dict[str, object] = {**super().describe(), "offset": self.offset, "scale": self.scale,
                                "inexact_sign_flips": self.inexact_signs}
        if self.prepare_change is not None:
            d["prepare_output_change"] = self.prepare_change
        return d


@METHODS.register("receding")
def make_receding(spec: MethodSpec, ctx: MethodContext) -> Method:
    return Receding(spec, ctx)
