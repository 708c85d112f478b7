"""Propagation rules for ops that reshape or reorder dims (flatten, view, permute, unsqueeze): where the
channel dim lands, and when a reshape folds it into another dim so its channels can only stay whole."""

from __future__ import annotations

import math

import numpy as np
import torch.fx as fx

from .core import RULES, ChanMap, Context, arg, op_of, set_map, shape


@RULES.register("flatten")
def flatten(cx: Context, node: fx.Node) -> None:
    src = node.args[0]
    m, si = cx.map_of(src), shape(cx, src)
    if not isinstance(m, ChanMap) or si is None:
        return
    if node.op == "call_module":
        mod = cx.module(node)
        start, end = mod.start_dim, mod.end_dim
    else:
        start, end = arg(node, 1, "start_dim", 0), arg(node, 2, "end_dim", -1)
    r = len(si)
    start, end = start % r, end % r
    if m.dim < start:
        set_map(cx, node, m)
    elif m.dim > end:
        set_map(cx, node, m.moved(m.dim - (end - start)))
    elif math.prod(si[start:m.dim]) != 1:
        cx.pin(m, f"{node.name} flattens the channels together with the dims before them")
    else:
        set_map(cx, node, m.moved(start, m.rep * math.prod(si[m.dim + 1:end + 1])))


@RULES.register("view")
def view(cx: Context, node: fx.Node) -> None:
    """A reshape keeps the channels when a dim of the result starts where they start and holds whole
    channels (``view(b, no, -1)``, a flatten). A channel shuffle's ``(g, C/g)`` split and the view back are
    followed as a grid whose columns go together, so the pruned tensor is still a valid shuffle. Anything
    else that cuts the channels apart (DFL's ``(4, 16)``) pins them."""
    src = node.args[0]
    m, si, so = cx.map_of(src), shape(cx, src), shape(cx, node)
    if not isinstance(m, ChanMap) or si is None or so is None:
        return
    if m.grid is not None:
        _unshuffle(cx, node, m, si, so)
        return
    pre = math.prod(si[:m.dim])
    c = m.atoms.size
    acc = 1
    for d2, size in enumerate(so):
        # Dims before d2 hold what the dims before the channels held, and d2 holds whole channels: each
        # channel's contiguous block (rep × the dims after it) becomes size // c steps of d2.
        if acc == pre and size >= c and size % c == 0:
            set_map(cx, node, m.moved(d2, size // c))
            return
        if acc == pre and m.rep == 1 and d2 + 1 < len(so) and size * so[d2 + 1] == c and size > 1 \
                and tuple(so[d2 + 2:]) == tuple(si[m.dim + 1:]) and cx.editable:
            grid = m.atoms.reshape(size, c // size)
            cx.union(grid.reshape(-1), np.tile(grid[0], size))  # each column goes or stays whole
            set_map(cx, node, ChanMap(d2, m.atoms, 1, (size, c // size)))
            return
        acc *= size
        if acc > pre:
            break
    cx.pin(m, f"{node.name} reshapes {tuple(si)} -> {tuple(so)}, which cuts the channels apart")


def _unshuffle(cx: Context, node: fx.Node, m: ChanMap, si: tuple[int, ...], so: tuple[int, ...]) -> None:
    rows, cols = m.grid
    if len(so) == len(si) - 1 and so[m.dim] == rows * cols and tuple(so[:m.dim]) == tuple(si[:m.dim]):
        set_map(cx, node, ChanMap(m.dim, m.atoms))
    else:
        cx.pin(m, f"{node.name} reshapes shuffled channels in a way that is not followed")


@RULES.register("permute")
def permute(cx: Context, node: fx.Node) -> None:
    m = cx.map_of(node.args[0])
    if not isinstance(m, ChanMap):
        return
    name = op_of(node)
    r = len(shape(cx, node.args[0]) or ())
    if name in ("permute",):
        dims = [d % r for d in (node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple))
                                else node.args[1:])]
        nd = dims.index(m.dim)
    elif name in ("t", "numpy_t"):
        nd = 1 - m.dim if r == 2 else m.dim
    else:  # transpose / swapaxes
        a, b = node.args[1] % r, node.args[2] % r
        nd = b if m.dim == a else a if m.dim == b else m.dim
    if m.grid is not None:
        a, b = (node.args[1] % r, node.args[2] % r) if name.startswith(("transpose", "swapaxes")) else (-1, -1)
        if name == "permute":
            swap = list(range(r))
            swap[m.dim], swap[m.dim + 1] = m.dim + 1, m.dim
            a, b = (m.dim, m.dim + 1) if dims == swap else (-1, -1)
        if {a, b} == {m.dim, m.dim + 1}:
            rows, cols = m.grid
            set_map(cx, node, ChanMap(m.dim, m.atoms.reshape(rows, cols).T.reshape(-1), 1, (cols, rows)))
        else:
            cx.pin(m, f"{node.name} moves shuffled channels")
        return
    if m.rep != 1 and nd != m.dim:
        cx.pin(m, f"{node.name} moves flattened channels")
        return
    set_map(cx, node, m.moved(nd))


@RULES.register("unsqueeze")
def unsqueeze(cx: Context, node: fx.Node) -> None:
    m, si, so = cx.map_of(node.args[0]), shape(cx, node.args[0]), shape(cx, node)
    if isinstance(m, ChanMap) and si is not None and so is not None:
        _track_singletons(cx, node, m, si, so)


def _track_singletons(cx: Context, node: fx.Node, m: ChanMap, si: tuple[int, ...], so: tuple[int, ...]) -> None:
    """squeeze/unsqueeze: the channel dim is the one of the same size with as many non-1 dims before it."""
    before = sum(1 for s in si[:m.dim] if s != 1)
    seen = 0
    for d2, s in enumerate(so):
        if s != 1 and seen == before and s == si[m.dim]:
            set_map(cx, node, m.moved(d2))
            return
        seen += s != 1
    cx.pin(m, f"{node.name} loses track of the channel dim")


RULES.register("squeeze")(unsqueeze)
