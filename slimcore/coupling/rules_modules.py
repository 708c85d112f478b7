"""Propagation rules for the lifted graph's modules (conv, linear, BatchNorm) and its ends (inputs and
outputs, whose channels stay)."""

from __future__ import annotations

import numpy as np
import torch.fx as fx

from .core import RULES, ChanMap, Context, set_map, shape


@RULES.register("conv_module")
def conv_module(cx: Context, node: fx.Node) -> None:
    mod = cx.module(node)
    name = str(node.target)
    m = cx.map_of(node.args[0])
    out_atoms = _module_atoms(cx, name, mod.out_channels)
    out = ChanMap(1, out_atoms)
    g = mod.groups
    if isinstance(m, ChanMap) and (m.dim != 1 or m.rep != 1):
        cx.pin(m, f"{name} reads them in a layout it cannot follow")
        m = None
    if isinstance(m, ChanMap):
        cx.record("in", name, m, groups=g)
    if g > 1:
        # A grouped (or depthwise) conv ties input block k to output block k: a whole group goes or stays.
        gi, go = mod.in_channels // g, mod.out_channels // g
        if isinstance(m, ChanMap):
            ins = m.atoms.reshape(g, gi)
            cx.union(out_atoms.reshape(g, go)[:, 0], ins[:, 0])
            for a in (ins, out_atoms.reshape(g, go)):
                if a.shape[1] > 1:
                    cx.union(a[:, 1:].reshape(-1), np.repeat(a[:, 0], a.shape[1] - 1))
        else:
            blocks = out_atoms.reshape(g, go)
            if go > 1:
                cx.union(blocks[:, 1:].reshape(-1), np.repeat(blocks[:, 0], go - 1))
            cx.pins.append((out_atoms, f"{name} is a grouped convolution whose inputs are not prunable"))
    cx.record("out", name, out, groups=g)
    set_map(cx, node, out)


@RULES.register("linear_module")
def linear_module(cx: Context, node: fx.Node) -> None:
    name = str(node.target)
    mod = cx.module(node)
    m, si = cx.map_of(node.args[0]), shape(cx, node.args[0])
    if isinstance(m, ChanMap):
        if si is not None and m.dim == len(si) - 1:
            cx.record("in", name, m)
        else:
            cx.pin(m, f"{name} does not read them as features")
    out = ChanMap(len(si) - 1 if si else 1, _module_atoms(cx, name, mod.out_features))
    cx.record("out", name, out)
    set_map(cx, node, out)


@RULES.register("bn_module")
def bn_module(cx: Context, node: fx.Node) -> None:
    name = str(node.target)
    m = cx.map_of(node.args[0])
    if not isinstance(m, ChanMap):
        return
    if m.dim != 1 or m.rep != 1:
        cx.pin(m, f"{name} normalises them in a layout it cannot follow")
        return
    cx.union(m.atoms, _module_atoms(cx, name, m.atoms.size))
    cx.record("bn", name, m)
    set_map(cx, node, m)


def _module_atoms(cx: Context, name: str, n: int) -> np.ndarray:
    """A module called more than once (shared weights) has one set of channels for all its calls."""
    key = "module:" + name
    if key not in cx.maps:
        cx.maps[key] = cx.fresh(n)
    return cx.maps[key]


@RULES.register("placeholder")
def placeholder(cx: Context, node: fx.Node) -> None:
    s = shape(cx, node)
    if s is not None and len(s) >= 2:
        atoms = cx.fresh(s[1])
        cx.pins.append((atoms, "the model's input channels"))
        set_map(cx, node, ChanMap(1, atoms))


@RULES.register("output")
def output(cx: Context, node: fx.Node) -> None:
    cx.pin_inputs(node, "they are the model's output")
