"""ISTA on γ (Ye et al. 2018): a proximal L1 step that makes γ exactly zero, weighted per layer by memory.

After the optimizer's plain SGD step, ``γ ← sign(γ)·max(|γ| − lr·ρ·λ_l, 0)``, computed as
``γ − clamp(γ, −τ, τ)`` with ``τ = lr·ρ·λ_l`` (exact zeros, four fused ``_foreach`` kernels, no host
sync). γ gets no momentum and no weight decay: ``param_groups`` puts it in its own SGD group with both
off, because momentum would carry a zeroed γ back out of zero and decay is a second, unweighted penalty.

λ_l, the paper's memory cost of one channel over the input pixel count, computed per coupled group
(a chain layer is a group of one producer and one BN)::

    λ = ( Σ_producers  weights per output channel      (conv: C_in/groups·k_h·k_w; linear: in_features)
        + Σ_consumers  weights per input channel       (conv: C_out/groups·k_h·k_w; linear: out_features
                                                          × features per channel after a flatten)
        + Σ_BNs of the group  output feature-map size   (H_out·W_out) ) / (H_in·W_in of the network input)

Depthwise convs count as producers (k_h·k_w per channel). For a chain this is the paper's
(k²·c_{l−1} + Σ_{l'∈T(l)} k²·c_{l'} + H_l·W_l)/(H·W). Feature-map sizes come from one forward pass: at
construction on ``MethodContext.example`` if given, else on the first training forward.

ρ (``strength``) default 2e-3: FINDINGS measured on 8×8 inputs (λ_l 5–15) that ρ ≥ 0.02 zeroed every
channel and ρ ≤ 3e-4 none; 2e-3 is near the geometric middle (√(0.02·3e-4) ≈ 2.4e-3). When the spec
gives no strength the pipeline's pilot (``pilot.py``) picks ρ in [1e-4, 5e-2] instead.

α (``alpha`` ≠ 1): ``prepare`` rescales γ, β ← α·γ, α·β and the consumers' input columns ← ÷α
(``_util.rescale``: exact through ReLU/pooling/add/concat, not through SiLU/GELU/sigmoid/ReLU6), so
ISTA works on a smaller γ scale; ``finalize`` undoes it (bit-exact round trip for α a power of two,
≤ 1 ulp otherwise; zeros stay zeros).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..spec import MethodSpec
from . import METHODS, Method, MethodContext
from ._util import SparesShare, eval_forward, group_bns, group_items, output_change, rescale

DEFAULT_RHO = 2e-3


def _weights_per_channel(ctx: MethodContext) -> dict[int, float]:
    """Group id → conv/linear weights that go with one of its channels (rows of producers, columns of consumers)."""
    out: dict[int, float] = {}
    for g in ctx.groups.groups:
        total = 0.0
        for mod, consumes, idxs in group_items(ctx.groups, g):
            per = len(idxs) / g.size  # > 1 for a linear after a flatten
            w = mod.weight
            if consumes:
                total += per * (w.shape[0] // getattr(mod, "groups", 1)) * w[0, 0].numel()
            else:
                total += per * w[0].numel()
        out[g.gid] = total
    return out


class Ista(SparesShare, Method):
    near_zero = 1e-12  # ISTA makes exact zeros
    exact_zeros = True

    def __init__(self, spec: MethodSpec, ctx: MethodContext) -> None:
        self.strength = spec.strength if spec.strength is not None else DEFAULT_RHO
        self.alpha = float(spec.alpha)
        self.ctx = ctx
        self.bns = group_bns(ctx.groups)
        self.gammas = [bn.weight for bn in self.bns]
        self.weights = _weights_per_channel(ctx)
        self.lambdas: list[torch.Tensor] | None = None  # per BN, per channel, on the CPU
        # steered runs turn the shrink off on each group's kept share (``SparesShare``): the proximal step
        # subtracts the same τ from every |γ| of a layer, so a strength near the edge zeroes whole layers at
        # once, a cliff found on the digits CNN (ρ 0.06 kept 0.98, 0.08 zeroed every channel)
        self._init_spares()  # ``_on``: the per-device λ, spared channels at 0
        self._fmap: dict[int, int] = {}
        self._pixels: int | None = None
        self.prepare_change: float | None = None
        self._hooks = [bn.register_forward_hook(self._see_bn) for bn in self.bns]
        self._hooks.append(ctx.model.register_forward_pre_hook(self._see_input))
        if ctx.example is not None:
            eval_forward(ctx.model, ctx.example)  # the hooks measure
            self._build()

    def _see_bn(self, mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        self._fmap[id(mod)] = out[0, 0].numel() if out.dim() > 2 else 1

    def _see_input(self, mod: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor) and self._pixels is None:
            x = args[0]
            self._pixels = x[0, 0].numel() if x.dim() > 2 else 1

    def _build(self) -> None:
        if self._pixels is None:
            raise RuntimeError("ISTA measures feature-map sizes on a forward pass; run one before the first step")
        for h in self._hooks:
            h.remove()
        lam = {id(bn): torch.zeros(bn.weight.numel()) for bn in self.bns}
        for g in self.ctx.groups.groups:
            cost = self.weights[g.gid] + sum(self._fmap.get(id(b.module), 1) for b in g.bns)
            for b in g.bns:
                if id(b.module) in lam:
                    lam[id(b.module)][b.bn_idx.cpu()] = cost / self._pixels
        self.lambdas = [lam[id(bn)] for bn in self.bns]

    def _lam(self, device: torch.device) -> list[torch.Tensor]:
        if self.lambdas is None:
            self._build()
        if device not in self._on:
            lam = self.lambdas if self.spared is None else [
                a * b for a, b in zip(self.lambdas, self.spared, strict=True)]  # type: ignore[arg-type]
            self._on[device] = [t.to(device) for t in lam]  # type: ignore[union-attr]
        return self._on[device]

    def prepare(self, model: nn.Module) -> None:
        if self.alpha != 1.0:
            self.prepare_change = output_change(
                model, self.ctx.example, lambda: rescale(self.ctx.groups, self.bns, self.alpha))

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        ids = {id(p) for p in self.gammas}
        rest = [p for p in model.parameters() if id(p) not in ids]
        groups: list[dict[str, Any]] = [{"params": rest}] if rest else []
        groups.append({"params": list(self.gammas), "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0,
                       "nesterov": False})
        return groups

    @torch.no_grad()
    def after_step(self, lr: float) -> None:
        if not self.gammas:
            return
        taus = torch._foreach_mul(self._lam(self.gammas[0].device), lr * self.strength)
        clip = torch._foreach_maximum(torch._foreach_minimum(self.gammas, taus), torch._foreach_neg(taus))
        torch._foreach_sub_(self.gammas, clip)  # |γ| ≤ τ: γ − γ = 0 exactly; else γ ∓ τ

    def finalize(self, model: nn.Module) -> None:
        for h in self._hooks:  # measuring hooks hold this method: never let a deepcopy of the model carry them
            h.remove()
        if self.alpha != 1.0:
            rescale(self.ctx.groups, self.bns, self.alpha, undo=True)

    def describe(self) -> dict[str, object]:
        d: dict[str, object] = {**super().describe(), "alpha": self.alpha}
        if self.lambdas is not None and self.lambdas:
            allv = torch.cat(self.lambdas)
            d["lambda_range"] = [round(float(allv.min()), 4), round(float(allv.max()), 4)]
        if self.prepare_change is not None:
            d["prepare_output_change"] = self.prepare_change
        return d


@METHODS.register("ista")
def make_ista(spec: MethodSpec, ctx: MethodContext) -> Method:
    return Ista(spec, ctx)
