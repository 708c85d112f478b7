"""Turn aten-level conv / batch-norm / linear / dropout calls into real ``nn`` modules.

Importers produce an fx graph of ``torch.ops.aten`` overload *packets* (packets, not overloads, so the
result can be ``torch.jit.script``-ed again at export) whose weights are ``get_attr`` nodes. This pass
swaps the calls that own prunable tensors for ``call_module`` nodes so Torch-Pruning's dependency graph
and our regularizers see Conv/BN/Linear modules holding the original tensors. Everything else is left
as it was.

Names: the lifted root has exactly two children, so nothing a user called a module can collide with
ours. :data:`MODULES` (``m``) holds the modules, each at the user's own path (``m.backbone.0`` for
``backbone.0``, ``m.m.0`` for a user's ``m.0``), which is why ``groups.public_name`` only strips ``m.``;
:data:`CONSTANTS` (``consts``) holds every tensor the importers read off the file, again under its
source path. Importers register constants only through :func:`constant_path`.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .. import io
from ..errors import UnsupportedModel

aten = torch.ops.aten

_CONV = {aten.conv1d: 1, aten.conv2d: 2, aten.conv3d: 3}
_BN = {aten.batch_norm, aten._native_batch_norm_legit_no_training, aten.native_batch_norm}
_CONV_MODULES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN_MODULES = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
MODULES, CONSTANTS = "m", "consts"


def constant_path(source: str) -> str:
    """Where a tensor read from the file at ``source`` (a dotted path, maybe empty) lives on the root."""
    return f"{CONSTANTS}.{source}" if source else CONSTANTS


def packet(target: Any) -> Any:
    """The overload packet of an aten OpOverload (scriptable), or the target unchanged."""
    return getattr(target, "overloadpacket", target)


def _arg(node: fx.Node, i: int, name: str, default: Any) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _tensor(gm: fx.GraphModule, n: Any) -> torch.Tensor | None:
    """The constant tensor a get_attr node points to (None for anything computed)."""
    if isinstance(n, fx.Node) and n.op == "get_attr":
        obj: Any = gm
        for part in str(n.target).split("."):
            obj = getattr(obj, part)
        if isinstance(obj, torch.Tensor):
            return obj
    return None


def _tup(v: Any, k: int) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * k
    v = tuple(int(a) for a in v)
    return v * k if len(v) == 1 and k > 1 else v


def _set(gm: nn.Module, dotted: str, mod: nn.Module) -> str:
    """Install ``mod`` at a fresh dotted path under gm; returns the path actually used."""
    parts = dotted.split(".")
    parent: nn.Module = gm
    for p in parts[:-1]:
        child = getattr(parent, p, None)
        if not isinstance(child, nn.Module):
            child = nn.Module()
            parent.add_module(p, child)
        parent = child
    leaf, i = parts[-1], 1
    while hasattr(parent, leaf if i == 1 else f"{leaf}_{i}"):
        i += 1
    leaf = leaf if i == 1 else f"{leaf}_{i}"
    parent.add_module(leaf, mod)
    return ".".join(parts[:-1] + [leaf])


def _module_path(weight: Any, node: fx.Node, kind: str) -> str:
    """The user's path of the module owning ``weight`` (its source path minus the tensor's name)."""
    source = str(weight.target) if isinstance(weight, fx.Node) and weight.op == "get_attr" else ""
    source = source.removeprefix(CONSTANTS + ".")
    if "." in source:
        return f"{MODULES}.{source.rsplit('.', 1)[0]}"
    return f"{MODULES}.{kind}_{node.name}"


def _conv(gm: fx.GraphModule, node: fx.Node, dims: int) -> nn.Module | None:
    w = _tensor(gm, _arg(node, 1, "weight", None))
    if w is None:
        return None
    braw = _arg(node, 2, "bias", None)
    b = _tensor(gm, braw)
    if braw is not None and b is None:
        return None
    stride = _tup(_arg(node, 3, "stride", 1), dims)
    padding = _arg(node, 4, "padding", 0)
    if isinstance(padding, str):
        pad: Any = padding
    else:
        pad = _tup(padding, dims)
    dilation = _tup(_arg(node, 5, "dilation", 1), dims)
    groups = int(_arg(node, 6, "groups", 1))
    out_c, in_per_g = w.shape[0], w.shape[1]
    mod = _CONV_MODULES[dims](in_per_g * groups, out_c, tuple(w.shape[2:]), stride=stride, padding=pad,
                              dilation=dilation, groups=groups, bias=b is not None,
                              device="meta")  # meta: skip a random init that is overwritten anyway
    mod.weight = nn.Parameter(w.detach().clone())
    if b is not None:
        mod.bias = nn.Parameter(b.detach().clone())
    return mod


def _bn(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    t = packet(node.target)
    w, b = _tensor(gm, _arg(node, 1, "weight", None)), _tensor(gm, _arg(node, 2, "bias", None))
    mean, var = _tensor(gm, _arg(node, 3, "running_mean", None)), _tensor(gm, _arg(node, 4, "running_var", None))
    if mean is None or var is None:
        return None
    if t is aten.batch_norm:
        momentum, eps = _arg(node, 6, "momentum", 0.1), _arg(node, 7, "eps", 1e-5)
    elif t is aten._native_batch_norm_legit_no_training:
        momentum, eps = _arg(node, 5, "momentum", 0.1), _arg(node, 6, "eps", 1e-5)
    else:  # native_batch_norm(input, w, b, mean, var, training, momentum, eps)
        momentum, eps = _arg(node, 6, "momentum", 0.1), _arg(node, 7, "eps", 1e-5)
    rank = node.args[0].meta.get("rank") if isinstance(node.args[0], fx.Node) else None
    c = mean.numel()
    cls = _BN_MODULES.get(rank or 4, nn.BatchNorm2d)
    mod = cls(c, eps=float(eps), momentum=float(momentum) if momentum is not None else 0.1)
    with torch.no_grad():
        mod.weight.copy_(w if w is not None else torch.ones(c))
        mod.bias.copy_(b if b is not None else torch.zeros(c))
        mod.running_mean.copy_(mean)
        mod.running_var.copy_(var)
    return mod


def _linear(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    w = _tensor(gm, _arg(node, 1, "weight", None))
    braw = _arg(node, 2, "bias", None)
    b = _tensor(gm, braw)
    if w is None or (braw is not None and b is None):
        return None
    mod = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
    mod.weight = nn.Parameter(w.detach().clone())
    if b is not None:
        mod.bias = nn.Parameter(b.detach().clone())
    return mod


def modularize(gm: fx.GraphModule, example: io.Inputs) -> fx.GraphModule:
    """Replace conv/BN/linear/dropout calls with modules under ``gm.m``, in place; returns ``gm``.

    ``example`` is run through the graph once so each BatchNorm gets the class of its input's rank.
    """
    _annotate_ranks(gm, example)
    if MODULES in gm._modules:
        raise AssertionError(f"the lifted root already has a {MODULES!r} (importers put tensors under {CONSTANTS!r})")
    gm.add_module(MODULES, nn.Module())
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        t = packet(node.target)
        mod: nn.Module | None = None
        kind = ""
        if t in _CONV:
            mod, kind = _conv(gm, node, _CONV[t]), "conv"
        elif t is aten.convolution or t is aten._convolution:
            mod, kind = _general_conv(gm, node), "conv"
        elif t in _BN:
            mod, kind = _bn(gm, node), "bn"
        elif t is aten.linear:
            mod, kind = _linear(gm, node), "fc"
        elif t in (aten.dropout, aten.dropout_, aten.feature_dropout, aten.feature_dropout_):
            mod, kind = nn.Dropout(float(_arg(node, 1, "p", 0.5))), "drop"
        if mod is None:
            continue
        mod.train(False)  # the lifted graph is the inference function; training code flips modes
        path = _set(gm, _module_path(_arg(node, 1, "weight", None), node, kind), mod)
        with graph.inserting_before(node):
            new = graph.call_module(path, (node.args[0],))
        new.meta = dict(node.meta)
        if t in (aten._native_batch_norm_legit_no_training, aten.native_batch_norm):
            # these return (out, save_mean, save_invstd); only [0] may be used in an inference graph
            for user in list(node.users):
                if user.target is operator.getitem and user.args[1] == 0:
                    user.replace_all_uses_with(new)
                    graph.erase_node(user)
                else:
                    raise UnsupportedModel(f"batch-norm statistics output used by node {user.name}")
        else:
            node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.eliminate_dead_code(is_impure_node=mutates)
    _drop_unused_attrs(gm)
    drop_empty_holders(gm)
    gm.recompile()
    return gm


def _general_conv(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    # convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups, ...)
    if bool(_arg(node, 6, "transposed", False)):
        return None
    w = _tensor(gm, node.args[1])
    if w is None:
        return None
    dims = w.dim() - 2
    fake = fx.Node(node.graph, "tmp", "call_function", aten.conv2d,
                   (node.args[0], node.args[1], node.args[2], node.args[3], node.args[4], node.args[5],
                    node.args[8]), {})
    try:
        return _conv(gm, fake, dims)
    finally:
        fake.args = ()  # a Node registers itself as a user of its args; unhook it or DCE keeps them


def mutates(node: fx.Node) -> bool:
    """fx's purity test misses in-place packets without a ``.default`` overload (``aten.add_``)."""
    if node.is_impure():
        return True
    t = node.target
    if isinstance(t, torch._ops.OpOverloadPacket):
        name = t._qualified_op_name.split("::")[-1]
        return name.endswith("_") and not name.endswith("__")
    return False


class _Ranks(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            n.meta["rank"] = out.dim()
        return out


def _annotate_ranks(gm: fx.GraphModule, example: io.Inputs) -> None:
    with torch.no_grad():
        _Ranks(gm).run(*io.args(example))


def drop_empty_holders(gm: fx.GraphModule) -> None:
    """Delete the plain holder modules under ``consts`` that modularize emptied (their tensors moved into ``m``)."""

    def empty(module: nn.Module) -> bool:
        for name, child in list(module._modules.items()):
            if type(child) is nn.Module and empty(child):
                del module._modules[name]
        return type(module) is nn.Module and not (module._modules or module._parameters or module._buffers)

    holder = gm._modules.get(CONSTANTS)
    if holder is not None and empty(holder):
        del gm._modules[CONSTANTS]


def _drop_unused_attrs(gm: fx.GraphModule) -> None:
    """Delete constant tensors no longer referenced by any get_attr (they now live in modules)."""
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_buffers()) + list(gm.named_parameters()):
        if name.startswith(MODULES + ".") or name in used:
            continue
        owner_path, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if attr in owner._buffers:
            del owner._buffers[attr]
        elif attr in owner._parameters:
            del owner._parameters[attr]
