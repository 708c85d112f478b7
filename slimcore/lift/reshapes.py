"""Un-bake the sizes of exported reshapes, and fence off the ones Torch-Pruning cannot follow.

``torch.export`` turns every static dim into a constant, so a ShuffleNet channel shuffle arrives as
``aten.view(x, [s0, 2, 24, 8, 8])``: correct for the upload, wrong the moment a channel is removed. Each
target dim is matched to the input dims it comes from (products of the exported symbolic sizes must
agree) and is then computed at run time: ``sym_size(x, i)`` for a one-to-one dim, a product of sizes
for a merge, ``size // (other factors)`` for a split, where a split's symbolic factor or else its
*largest* factor follows the tensor (a shuffle's group count stays, channels per group follow, as in
torchvision's eager code). A dim that matches nothing keeps its constant.

Run-time sizes are not enough for pruning. Torch-Pruning only understands reshapes that leave the
channel dim alone or flatten ``(N, C, ...)`` to ``(N, F)``; a reshape that splits or merges channels
(a channel shuffle) is a permutation it cannot map, and in TP 1.6.1 its reshape inference even divides
by zero on ShuffleNetV2, eager torchvision model included. So such a reshape becomes a *barrier*: it is
rewritten as ``as_strided(contiguous(x), sizes, strides)`` (same values; TP treats it element-wise, so
the dependency graph builds), preceded by an element-count assertion so a bad prune fails loudly
instead of dropping data, and every conv/linear whose output channels reach it is reported as
unprunable. Marking, not remapping, is the honest choice: channels crossing a shuffle are permuted,
and no group TP can form removes the right ones on both sides.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch import nn

from .modularize import mutates, packet

aten = torch.ops.aten

_VIEWS = {aten.view, aten.reshape, aten._unsafe_view}
_SIZE_OPS = {aten.sym_size, aten.sym_numel, aten.size, aten.numel, aten.sym_stride, aten._assert_scalar}
_INT_OPS = {operator.mul, operator.floordiv, operator.eq, operator.add, operator.sub}
BARRIER = "slim_barrier"  # node.meta key on a rewritten reshape: why its channels are unprunable
_Plan = list[tuple[list[int], list[int]]]


def unbake_views(gm: fx.GraphModule) -> int:
    """Rewrite view/reshape sizes to follow the input at run time; returns how many became barriers.

    Needs the exported ``meta["val"]`` of each reshape and its input, so run it before meta is dropped.
    """
    graph = gm.graph
    barriers = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or packet(node.target) not in _VIEWS or len(node.args) < 2:
            continue
        x, old = node.args[0], node.args[1]
        xv = x.meta.get("val") if isinstance(x, fx.Node) else None
        ov = node.meta.get("val")
        if not isinstance(xv, torch.Tensor) or not isinstance(ov, torch.Tensor):
            continue
        if not isinstance(old, (list, tuple)) or len(old) != ov.dim():
            continue
        plan = _align([_expr(d) for d in xv.shape], [_expr(d) for d in ov.shape])
        with graph.inserting_before(node):
            sizes = list(old) if plan is None else _sizes(graph, x, plan, ov.shape, old)
            if plan is not None:  # slimcore.coupling follows (or pins, with the reason) any aligned reshape
                node.args = (x, sizes, *node.args[2:])
                continue
            new = _as_strided(graph, x, sizes)
        new.meta = dict(node.meta)
        new.meta[BARRIER] = (f"its channels pass through reshape {node.name} "
                             f"{_fmt(xv.shape)} -> {_fmt(ov.shape)}, which mixes channels with other dims")
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        barriers += 1
    graph.eliminate_dead_code(is_impure_node=mutates)
    gm.recompile()
    return barriers


def unbake_chunks(gm: fx.GraphModule) -> int:
    """Turn ``chunk``/``split`` into ``split_with_sizes`` with sizes computed at run time.

    TP 1.6.1 reads a split's sizes only from ``SplitWithSizesBackward`` (``_saved_split_sizes``); for
    ``chunk`` under current torch it falls back to guessing them from neighbours, guesses wrong on
    ShuffleNetV2 and fails with an IndexError. The number of pieces is the exported one; the last piece
    takes what is left, so a prune that changes how many pieces there are fails loudly.
    """
    count = 0
    for node in list(gm.graph.nodes):
        t = packet(node.target) if node.op == "call_function" else None
        if t not in (aten.chunk, aten.split) or len(node.args) < 2 or not isinstance(node.args[1], int):
            continue
        xv, outs = node.args[0].meta.get("val"), node.meta.get("val")
        if not isinstance(xv, torch.Tensor) or not isinstance(outs, (list, tuple)) or not outs:
            continue
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        dim = int(dim) % xv.dim()
        k, graph = len(outs), gm.graph
        with graph.inserting_before(node):
            total = graph.call_function(aten.sym_size, (node.args[0], dim))
            if t is aten.chunk:  # chunk size = ceil(total / n)
                n = node.args[1]
                piece: Any = graph.call_function(operator.floordiv,
                                                 (graph.call_function(operator.add, (total, n - 1)), n))
            else:
                piece = node.args[1]
            rest = graph.call_function(operator.sub, (total, _mul(graph, piece, k - 1)))
        node.target = aten.split_with_sizes
        node.args, node.kwargs = (node.args[0], [piece] * (k - 1) + [rest], dim), {}
        count += 1
    gm.recompile()
    return count


def unprunable_layers(gm: fx.GraphModule) -> dict[str, str]:
    """Conv/linear modules whose output channels reach a barrier, with the reason (run after modularize).

    Walks from each barrier through every op that keeps channels aligned, up and down stream, and stops
    at convolutions and linears: one reached from its output side is recorded; one reached from its
    input side only consumes the channels. Depthwise convolutions tie their input and output channels,
    so they are recorded and walked through.
    """
    found: dict[str, str] = {}
    for b in [n for n in gm.graph.nodes if BARRIER in n.meta]:
        why = str(b.meta[BARRIER])
        stack: list[fx.Node] = [b]
        seen: set[fx.Node] = set()
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            for nb, upstream in [(i, True) for i in n.all_input_nodes] + [(u, False) for u in n.users]:
                kind = _kind(gm, nb)
                if kind == "layer":
                    if upstream:
                        found.setdefault(str(nb.target), why)
                elif kind == "depthwise":
                    found.setdefault(str(nb.target), why)
                    stack.append(nb)
                elif kind == "pass":
                    stack.append(nb)
    return found


def _kind(gm: fx.GraphModule, n: fx.Node) -> str:
    if n.op == "call_module":
        mod = gm.get_submodule(str(n.target))
        if isinstance(mod, nn.modules.conv._ConvNd):
            return "depthwise" if mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels \
                else "layer"
        return "layer" if isinstance(mod, nn.Linear) else "pass"
    if n.op == "call_function":
        if packet(n.target) in _SIZE_OPS or n.target in _INT_OPS:
            return "stop"
        return "pass"
    return "stop"


def _fmt(shape: Sequence[Any]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _expr(d: Any) -> Any:
    return d.node.expr if isinstance(d, torch.SymInt) else int(d)


def _tp_safe(plan: _Plan, in_rank: int, out_rank: int) -> bool:
    """Whether TP maps this reshape right: batch and channels untouched, or a flatten to (N, F)."""
    if in_rank < 2:
        return True
    by_src = {i: (a, b) for a, b in plan for i in a}
    if by_src.get(0) != ([0], [0]):
        return False
    a, b = by_src.get(1, ([], []))
    return (a, b) == ([1], [1]) or (a == list(range(1, in_rank)) and b == [1] and out_rank == 2)


def _align(src: Sequence[Any], dst: Sequence[Any]) -> _Plan | None:
    """Pair consecutive runs of input and output dims with equal products; None if they don't line up.

    Size-1 dims on either side become runs of their own (an output 1 keeps its constant).
    """
    plan: _Plan = []
    i = j = 0
    while i < len(src) or j < len(dst):
        if j < len(dst) and dst[j] == 1 and (i >= len(src) or src[i] != 1):
            plan.append(([], [j]))
            j += 1
            continue
        if i < len(src) and src[i] == 1 and (j >= len(dst) or dst[j] != 1):
            plan.append(([i], []))
            i += 1
            continue
        if i >= len(src) or j >= len(dst):
            return None
        a, b = [i], [j]
        pa, pb = src[i], dst[j]
        i, j = i + 1, j + 1
        while not _equal(pa, pb):
            if _less(pa, pb) and i < len(src):
                pa, a, i = pa * src[i], [*a, i], i + 1
            elif not _less(pa, pb) and j < len(dst):
                pb, b, j = pb * dst[j], [*b, j], j + 1
            else:
                return None
        if len(a) > 1 and len(b) > 1:
            return None
        plan.append((a, b))
    return plan


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        return bool(sympy.expand(sympy.sympify(a) - sympy.sympify(b)) == 0)
    except Exception:
        return False


def _less(a: Any, b: Any) -> bool:
    """Whether ``a`` should grow to meet ``b`` (it is the smaller, or the one with fewer symbols)."""
    if isinstance(a, int) and isinstance(b, int):
        return a < b
    try:
        sa, sb = sympy.sympify(a), sympy.sympify(b)
        q = sympy.simplify(sb / sa)
        if q.is_number:
            return bool(q > 1)
        return len(sa.free_symbols) < len(sb.free_symbols)
    except Exception:
        return False


def _sizes(graph: fx.Graph, x: fx.Node, plan: _Plan, out_shape: Sequence[Any], old: Sequence[Any]) -> list[Any]:
    """New size arguments for a reshape of ``x``; groups that cannot be derived keep their ``old`` entries."""
    sizes: list[Any] = list(old)

    def size(i: int) -> fx.Node:
        return graph.call_function(aten.sym_size, (x, i))

    for a, b in plan:
        if not b:
            continue
        if not a:  # an output dim of 1 with no input dim behind it
            sizes[b[0]] = 1
        elif len(b) == 1:  # one-to-one or a merge: multiply the input sizes at run time
            v: Any = size(a[0])
            for k in a[1:]:
                v = graph.call_function(operator.mul, (v, size(k)))
            sizes[b[0]] = v
        else:  # a split: derive the symbolic factor, else the largest; the others stay constant
            consts = [int(out_shape[k]) if isinstance(out_shape[k], int) else None for k in b]
            free = [t for t, c in enumerate(consts) if c is None]
            if len(free) > 1:
                continue
            derived = free[0] if free else max(range(len(b)), key=lambda t: (consts[t], t))
            rest = math.prod(int(c) for t, c in enumerate(consts) if t != derived and c is not None)
            for t, k in enumerate(b):
                sizes[k] = consts[t] if t != derived else graph.call_function(operator.floordiv,
                                                                              (size(a[0]), rest))
    return sizes


def _mul(graph: fx.Graph, a: Any, b: Any) -> Any:
    if isinstance(a, int) and isinstance(b, int):
        return a * b
    if isinstance(a, int) and a == 1:
        return b
    if isinstance(b, int) and b == 1:
        return a
    return graph.call_function(operator.mul, (a, b))


def _as_strided(graph: fx.Graph, x: fx.Node, sizes: list[Any]) -> fx.Node:
    """``x.view(sizes)`` by values, as an op TP treats element-wise; asserts the element count first."""
    strides: list[Any] = [1] * len(sizes)
    for k in range(len(sizes) - 2, -1, -1):
        strides[k] = _mul(graph, strides[k + 1], sizes[k + 1])
    total = _mul(graph, strides[0], sizes[0]) if sizes else 1
    same = graph.call_function(operator.eq, (graph.call_function(aten.sym_numel, (x,)), total))
    graph.call_function(aten._assert_scalar, (same, "reshape sizes no longer match the tensor: channels "
                                                    "were removed across a channel shuffle"))
    flat = graph.call_function(aten.contiguous, (x,))
    return graph.call_function(aten.as_strided, (flat, sizes, strides))
