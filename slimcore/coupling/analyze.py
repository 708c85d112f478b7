"""One linear pass over the fx graph: shapes from one forward, then every node's rule, then components.

The result, :class:`Coupling`, names modules, nodes and constants by *name* (never by object), so one
analysis applies to a deep copy of the model as well (the FLOP/parameter target search prunes copies).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from . import rules as R
from .core import RULES, ChanMap, Context, Record, components, op_name

_NAMED = {"cat": "cat", "concat": "cat", "concatenate": "cat", "stack": "stack", "split": "split",
          "split_with_sizes": "split", "chunk": "split", "unsafe_split": "split", "unsafe_split_with_sizes": "split",
          "unbind": "split", "getitem": "getitem", "slice": "slice", "narrow": "narrow", "select": "select",
          "index": "index", "index_select": "index",
          "flatten": "flatten", "module:flatten": "flatten", "permute": "permute", "transpose": "permute",
          "swapaxes": "permute", "t": "permute", "unsqueeze": "unsqueeze", "squeeze": "squeeze",
          "softmax": "softmax", "_softmax": "softmax", "log_softmax": "softmax", "_log_softmax": "softmax",
          "module:softmax": "softmax", "constant_pad_nd": "pad", "pad": "pad", "expand": "expand",
          "expand_as": "expand", "conv_module": "conv_module", "linear_module": "linear_module",
          "bn_module": "bn_module", "placeholder": "placeholder", "output": "output"}


def rule_for(name: str) -> str | None:
    if name in _NAMED:
        return _NAMED[name]
    if name in R.UNARY:
        return "unary"
    if name in R.BINARY:
        return "binary"
    if name in R.REDUCE:
        return "reduce"
    if name in R.VIEWS:
        return "view"
    return None


@dataclass
class Coupling:
    n_atoms: int
    label: np.ndarray  # atom → component label
    pinned: dict[int, str]  # component label → why it must stay
    records: list[Record]
    editable: bool
    seconds: float = 0.0
    unknown_ops: dict[str, int] = field(default_factory=dict)

    def comp(self, atoms: np.ndarray) -> np.ndarray:
        return self.label[atoms]


class _Shapes(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[str, Any] = {}
        self.values: dict[str, int] = {}  # int results (sizes computed at run time: slice bounds)

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.shapes[n.name] = _shape_tree(out)
        if isinstance(out, int) and not isinstance(out, bool):
            self.values[n.name] = out
        return out


def _shape_tree(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.shape
    if isinstance(v, (list, tuple)):
        return [_shape_tree(x) for x in v]
    return None


def as_graph(model: nn.Module) -> tuple[fx.GraphModule, bool]:
    """The graph to analyse and whether its code may be rewritten (a lifted model) or not (an eager model,
    traced here only to be read; its modules are shared with the model, so module surgery still applies)."""
    if isinstance(model, fx.GraphModule):
        return model, True
    return fx.symbolic_trace(model), False


@torch.no_grad()
def analyze(model: nn.Module, example: Any, pins: dict[str, str] | None = None) -> Coupling:
    """``pins``: module path → reason; those modules' output channels stay (``prune.ignore``, importer
    barriers, output layers)."""
    t0 = time.perf_counter()
    gm, editable = as_graph(model)
    was = model.training
    model.eval()
    try:
        sp = _Shapes(gm)
        sp.run(*(example if isinstance(example, tuple) else (example,)))
    finally:
        model.train(was)
    cx = Context(gm, sp.shapes, editable)
    cx.values = sp.values
    unknown: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            continue
        name = op_name(gm, node)
        if name in R.SHAPE_ONLY:
            continue
        key = rule_for(name)
        if key is None:
            if all(cx.map_of(a) is None for a in node.all_input_nodes):
                continue  # int arithmetic on sizes and the like: no channels involved
            unknown[name] = unknown.get(name, 0) + 1
            R.unknown(cx, node, name)
            continue
        if key not in ("unary", "view", "permute") and any(
                isinstance(cx.map_of(a), ChanMap) and cx.map_of(a).grid is not None for a in node.all_input_nodes):
            R.unknown(cx, node, name + " of shuffled channels")
            continue
        RULES.get(key)(cx, node)
    for rec in cx.records:
        if rec.kind == "out" and rec.name in (pins or {}):
            cx.pins.append((rec.atoms, pins[rec.name]))
    label = components(cx.n_atoms, cx.pairs)
    pinned: dict[int, str] = {}
    for atoms, why in cx.pins:
        for lab in np.unique(label[atoms]).tolist():
            pinned.setdefault(int(lab), why)
    return Coupling(cx.n_atoms, label, pinned, cx.records, editable, time.perf_counter() - t0, unknown)
