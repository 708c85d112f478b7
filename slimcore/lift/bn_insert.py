"""Give BatchNorm-less convolutions a BatchNorm again, and fold such BatchNorms away for export.

Network slimming ranks channels by BatchNorm γ. Most ONNX uploads have BN folded into the preceding
Conv (both ``torch.onnx.export`` paths do it in eval mode), so there is nothing to rank and nothing for
the sparsity penalty to act on. :func:`reinsert_bn` puts an identity BatchNorm after each such conv:
from a calibration pass it sets ``running_mean = μ``, ``running_var = σ²`` (the conv output's
per-channel statistics), ``γ = sqrt(σ² + eps)`` and ``β = μ``, so in eval ``BN(y) = y`` for *every*
input, not only the calibration data, and γ starts as the channel's output scale (its standard
deviation): a usable first importance that sparse training then refines. In train mode the BN
normalizes with batch statistics, which is what lets the penalty on γ work as in the paper.

Dead channels: a channel whose output never varies on the calibration data gets ``γ = sqrt(eps)``
(still an exact identity, since ``running_var = 0``), a small importance that ranks it among the first
to go, which is right: it carries no information there, and pruning folds its mean into the
consumers' bias. γ is exactly 0 only for a channel whose conv weights are all zero: its output is the
constant bias for any input, so ``BN(y) = β = μ`` is exact everywhere.

Which convs get one: every ``Conv1d/2d/3d`` whose output is not consumed solely by a BatchNorm, except
the output layer (its channels are the model's outputs and are never pruned) and grouped convs that are
not depthwise (``groups == in == out``): grouping blocks pruning of their groups anyway (see
``slimcore.groups``), while a depthwise conv's own BN is what ranks its channels. The inserted BN sits
between the conv and *all* its former users, so every path sees the same gated channels.

The inserted modules are recorded in ``gm.meta["reinserted_bn"]`` (a set of module paths, ``m.``
prefix included; ``GraphModule`` deep copies keep ``meta``) so the exporter can fold exactly those back
with :func:`fold_bn` and hand the user a file shaped like the upload.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from .. import io
from ..groups import BN_TYPES, CONV_TYPES, output_layers, public_name
from .modularize import _set

META_KEY = "reinserted_bn"
_BN_FOR_CONV: dict[type, type[nn.Module]] = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d,
                                             nn.Conv3d: nn.BatchNorm3d}


def reinsert_bn(gm: fx.GraphModule, calib: list[io.Inputs]) -> list[str]:
    """Insert an identity BatchNorm after every eligible conv; returns the public names of those convs.

    ``calib`` is a list of input batches; statistics are taken in eval mode without gradients. The
    model's function is unchanged in eval mode (to float rounding). Raises ValueError without batches.
    """
    if not calib:
        raise ValueError("reinsert_bn needs at least one calibration batch")
    outputs = set(output_layers(gm))
    chosen: list[tuple[fx.Node, nn.Module]] = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(str(node.target))
        if type(mod) not in _BN_FOR_CONV or str(node.target) in outputs or not _eligible(mod):
            continue
        users = list(node.users)
        if users and all(_is_bn(gm, u) for u in users):
            continue
        chosen.append((node, mod))
    if not chosen:
        return []
    stats = _conv_stats(gm, [m for _, m in chosen], calib)
    inserted: set[str] = set(gm.meta.get(META_KEY, set()))
    names: list[str] = []
    for node, conv in chosen:
        mean, var = stats[conv]
        bn = _identity_bn(conv, mean, var)
        bn.train(gm.training)
        path = _set(gm, f"{node.target}_bn", bn)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(path, (node,))
        node.replace_all_uses_with(new, delete_user_cb=lambda u, new=new: u is not new)
        new.meta.update({k: v for k, v in node.meta.items() if k in ("rank", "stack_trace")})
        new.meta[META_KEY] = True
        inserted.add(path)
        names.append(public_name(str(node.target)))
    gm.meta[META_KEY] = inserted
    gm.graph.lint()
    gm.recompile()
    return names


def fold_bn(gm: fx.GraphModule, which: set[str] | None = None) -> list[str]:
    """Fold eval-mode BatchNorms that directly follow a conv into its weight and bias; returns their paths.

    ``which`` limits folding to these module paths (``m.`` prefix included, as in
    ``gm.meta["reinserted_bn"]``); None folds every foldable BN. A BN is foldable when its input is a
    conv module whose output feeds nothing else (else the other users would see the scaled output).
    Folded BNs leave the graph, the module tree and ``gm.meta["reinserted_bn"]``. Exact in eval mode.
    """
    folded: list[str] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or (which is not None and str(node.target) not in which):
            continue
        bn = gm.get_submodule(str(node.target))
        src = node.args[0] if node.args else None
        if not isinstance(bn, BN_TYPES) or not isinstance(src, fx.Node) or src.op != "call_module":
            continue
        conv = gm.get_submodule(str(src.target))
        if not isinstance(conv, CONV_TYPES) or len(src.users) != 1 or bn.running_var is None:
            continue
        _fold_into(conv, bn)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        _delete(gm, str(node.target))
        folded.append(str(node.target))
    if folded:
        left = set(gm.meta.get(META_KEY, set())) - set(folded)
        gm.meta[META_KEY] = left
        gm.graph.lint()
        gm.recompile()
    return folded


def _eligible(conv: nn.Module) -> bool:
    """Plain convs and depthwise ones (``groups == in == out``); not other grouped convs."""
    g = int(conv.groups)
    return g == 1 or g == conv.in_channels == conv.out_channels


def _is_bn(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), BN_TYPES)


@torch.no_grad()
def _conv_stats(gm: fx.GraphModule, convs: list[nn.Module],
                calib: list[io.Inputs]) -> dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """Per-output-channel mean and (population) variance of each conv's output, accumulated in float64."""
    acc: dict[nn.Module, list[torch.Tensor | int]] = {}

    def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        y = out.detach().transpose(0, 1).reshape(out.shape[1], -1).double()
        s = acc.setdefault(mod, [torch.zeros(y.shape[0], dtype=torch.float64, device=y.device),
                                 torch.zeros(y.shape[0], dtype=torch.float64, device=y.device), 0])
        s[0] = s[0] + y.sum(1)
        s[1] = s[1] + (y * y).sum(1)
        s[2] = int(s[2]) + y.shape[1]

    handles = [c.register_forward_hook(hook) for c in convs]
    was = gm.training
    gm.eval()
    dev = next((p.device for p in gm.parameters()), torch.device("cpu"))
    try:
        for x in calib:
            io.call(gm, io.apply(x, lambda t: t.to(dev)))
    finally:
        for h in handles:
            h.remove()
        gm.train(was)
    out: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
    for conv in convs:
        s0, s1, n = acc[conv]
        mean = s0 / n
        var = (s1 / n - mean * mean).clamp_min(0.0)
        out[conv] = (mean, var)
    return out


def _identity_bn(conv: nn.Module, mean: torch.Tensor, var: torch.Tensor) -> nn.Module:
    """A BN with running stats (μ, σ²), γ = sqrt(σ² + eps) (0 for all-zero filters) and β = μ."""
    w = conv.weight.detach()
    bn = _BN_FOR_CONV[type(conv)](w.shape[0], device=w.device, dtype=w.dtype)
    gamma = (var + bn.eps).sqrt()
    zero = w.flatten(1).abs().amax(1) == 0  # a constant channel: output = bias for every input
    gamma[zero] = 0.0
    var = torch.where(zero, torch.zeros_like(var), var)
    with torch.no_grad():
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        bn.weight.copy_(gamma)
        bn.bias.copy_(mean)
    return bn


@torch.no_grad()
def _fold_into(conv: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """W' = W·s, b' = (b − μ)·s + β with s = γ / sqrt(var + eps), computed in float64."""
    w = conv.weight
    var = bn.running_var.double()
    mean = bn.running_mean.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / (var + bn.eps).sqrt()
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(var)
    if conv.bias is None:
        conv.bias = nn.Parameter(torch.zeros(w.shape[0], device=w.device, dtype=w.dtype))
    w.copy_((w.double() * scale.view(-1, *([1] * (w.dim() - 1)))).to(w.dtype))
    conv.bias.copy_(((bias - mean) * scale + beta).to(w.dtype))


def _delete(gm: fx.GraphModule, path: str) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    delattr(parent, leaf)
