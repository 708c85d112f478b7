"""The core of our own channel-dependency analysis: channel atoms, their maps on tensors, and the context
every propagation rule works on.

Why our own instead of Torch-Pruning's ``DependencyGraph``: TP 1.6.1 misreads channel splits (CSP, C2f,
Res2Net, MixNet), corrupts grouped convolutions, divides by zero on shuffles, and its grouping is
super-linear (timm ``rexnet_100`` sat in ``get_all_groups`` for 15 minutes). The lifted fx graph already
has one op per node and every tensor's shape, so channel propagation over it is a single linear pass.

The model: every channel that some op *creates* (a conv/linear output channel, an input channel, the
output of an op we do not understand) is an **atom**, a small integer. Each tensor value carries a
:class:`ChanMap`: which atom sits at each position of its channel dim. Ops that must keep channels
aligned (residual adds, SE gates, depthwise convs, shared constants) record *unions* of atoms; ops that
rearrange channels (cat, split, slice, flatten) rearrange the atom arrays. Atoms end in connected
components; a component is removed whole or not at all, and a component that touches anything we
cannot change (the model's inputs and outputs, an unknown op, a channel-mixing reshape) is **pinned**
with the reason. Nothing is ever guessed: an op without a rule pins the channels it sees.

A rule has one signature, ``rule(cx: Context, node: fx.Node) -> None``, and sets ``cx.maps[node]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ..registry import Registry

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class ChanMap:
    """The atoms along one dim of a tensor: position ``i*rep .. (i+1)*rep - 1`` of ``dim`` holds atom
    ``atoms[i]`` (``rep`` > 1 after a flatten merged the channel dim with the spatial dims after it)."""

    dim: int
    atoms: np.ndarray
    rep: int = 1
    # A channel shuffle's view splits the channels over two dims: (rows, cols) over dims dim, dim + 1,
    # atoms in row-major order. Only a transpose of those two dims and the view back follow such a map.
    grid: tuple[int, int] | None = None

    def moved(self, dim: int, rep: int | None = None) -> ChanMap:
        return ChanMap(dim, self.atoms, self.rep if rep is None else rep, self.grid)


Rule = Callable[["Context", fx.Node], None]
RULES: Registry[Rule] = Registry("channel rule")


@dataclass
class Record:
    """A place whose size follows the atoms: a module's dim, a split's pieces, a slice, a constant."""

    kind: str  # "out" | "in" | "bn" | "split" | "slice" | "const"
    name: str  # module path, node name or get_attr target
    atoms: np.ndarray
    rep: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


class Context:
    """State of one analysis pass. Rules read shapes and maps of their inputs and record what they do."""

    def __init__(self, gm: fx.GraphModule, shapes: dict[str, Any], editable: bool) -> None:
        self.gm = gm
        self.shapes = shapes  # node name → torch.Size, a list of them (tuple outputs), or None
        self.editable = editable  # graph literals (split sizes, slice bounds) can be rewritten
        self.maps: dict[str, Any] = {}  # node name → ChanMap | list[ChanMap | None] | None
        self.values: dict[str, int] = {}  # node name → int it computed on the example (run-time sizes)
        self.n_atoms = 0
        self.pairs: list[tuple[np.ndarray, np.ndarray]] = []
        self.pins: list[tuple[np.ndarray, str]] = []
        self.records: list[Record] = []
        self._seen: dict[tuple[str, str], Record] = {}
        self.modules = dict(gm.named_modules())

    # atoms -------------------------------------------------------------------------------------------
    def fresh(self, n: int) -> np.ndarray:
        out = np.arange(self.n_atoms, self.n_atoms + n, dtype=np.int64)
        self.n_atoms += n
        return out

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        if a.size:
            self.pairs.append((np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)))

    def union_all(self, atoms: np.ndarray) -> None:
        if atoms.size > 1:
            self.union(atoms[1:], np.full(atoms.size - 1, atoms[0], dtype=np.int64))

    def pin(self, m: Any, why: str) -> None:
        for cm in _maps_in(m):
            self.pins.append((cm.atoms, why))

    def record(self, kind: str, name: str, cm: ChanMap, **extra: Any) -> None:
        if kind in ("in", "out", "bn", "const"):  # one module or constant, several uses: one set of channels
            prev = self._seen.get((kind, name))
            if prev is not None:
                if prev.atoms.size == cm.atoms.size and prev.rep == cm.rep:
                    self.union(prev.atoms, cm.atoms)
                else:
                    self.pins.append((np.concatenate([prev.atoms, cm.atoms]), f"{name} is used with two layouts"))
                return
        rec = Record(kind, name, cm.atoms, cm.rep, dict(extra))
        self._seen[(kind, name)] = rec
        self.records.append(rec)

    # graph -------------------------------------------------------------------------------------------
    def map_of(self, a: Any) -> Any:
        return self.maps.get(a.name) if isinstance(a, fx.Node) else None

    def shape_of(self, a: Any) -> Any:
        return self.shapes.get(a.name) if isinstance(a, fx.Node) else None

    def module(self, node: fx.Node) -> nn.Module:
        return self.modules[str(node.target)]

    def pin_inputs(self, node: fx.Node, why: str) -> None:
        for a in _flat_nodes(node.args, node.kwargs):
            self.pin(self.map_of(a), why)


def _maps_in(m: Any) -> list[ChanMap]:
    if isinstance(m, ChanMap):
        return [m]
    if isinstance(m, (list, tuple)):
        return [c for x in m for c in _maps_in(x)]
    return []


def _flat_nodes(*trees: Any) -> list[fx.Node]:
    out: list[fx.Node] = []

    def walk(v: Any) -> None:
        if isinstance(v, fx.Node):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)

    for t in trees:
        walk(t)
    return out


def components(n_atoms: int, pairs: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Connected-component label of every atom (the smallest atom id in it), by vectorised min-label
    propagation with pointer jumping: linear work per round, a handful of rounds on real models."""
    labels = np.arange(n_atoms, dtype=np.int64)
    if not pairs or n_atoms == 0:
        return labels
    a = np.concatenate([p[0] for p in pairs])
    b = np.concatenate([p[1] for p in pairs])
    while True:
        la, lb = labels[a], labels[b]
        low = np.minimum(la, lb)
        if np.array_equal(la, lb):
            break
        np.minimum.at(labels, a, low)
        np.minimum.at(labels, b, low)
        while True:  # pointer jumping: every atom points at its label's label
            nxt = labels[labels]
            if np.array_equal(nxt, labels):
                break
            labels = nxt
    return labels


def op_name(gm: fx.GraphModule, node: fx.Node) -> str:
    """One name per op whatever the graph's flavour: aten overload packets from our lifters, torch
    functions and methods from ``symbolic_trace`` of an eager model, and leaf modules. In-place variants
    (``relu_``) share their op's rule."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if isinstance(mod, CONV_TYPES):
            return "conv_module"
        if isinstance(mod, BN_TYPES):
            return "bn_module"
        if isinstance(mod, nn.Linear):
            return "linear_module"
        return "module:" + type(mod).__name__.lower()
    if node.op == "call_method":
        name = str(node.target)
    elif node.op == "call_function":
        t = node.target
        name = getattr(t, "__name__", None) or str(t).rsplit(".", 1)[-1]
        if isinstance(t, (torch._ops.OpOverload,)):
            name = t.overloadpacket.__name__
    else:
        return node.op
    if name.endswith("_") and not name.endswith("__") and not name.startswith("_"):
        name = name[:-1]
    return name


# Helpers every rule module uses (the rules live in rules.py, rules_views.py and rules_modules.py).

def shape(cx: Context, a: Any) -> tuple[int, ...] | None:
    s = cx.shape_of(a)
    return tuple(s) if isinstance(s, torch.Size) else None


def arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def set_map(cx: Context, node: fx.Node, m: Any) -> None:
    cx.maps[node.name] = m


def op_of(node: fx.Node) -> str:
    t = node.target
    return str(t) if node.op == "call_method" else str(getattr(t, "__name__", t)).rstrip("_")
