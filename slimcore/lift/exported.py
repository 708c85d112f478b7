"""Lift a ``torch.export`` program (``.pt2``) into a prunable GraphModule.

``ep.module()`` is runnable but not ours to prune: its forward wraps the graph in pytree
flatten/unflatten code, carries a ``_guards_fn`` that re-checks the exported shapes, and its
parameters are plain attributes of a ``_StatefulGraphModule``. So the importer copies its nodes into a
fresh graph on a plain root module (constants become buffers under their original dotted names, aten
overloads become overload packets) and lets :func:`modularize` turn conv/BN/linear calls into modules.

Shapes: ``torch.export`` bakes every static dim into the graph (a channel shuffle becomes
``aten.view(x, [s0, 2, 24, 8, 8])``). We rewrite reshapes to compute sizes at run time rather than give
up on them, and where Torch-Pruning cannot follow a reshape (one that mixes channels with other dims)
we fence it and list the layers feeding it in ``meta["unprunable"]``; see :mod:`.reshapes` for why
both are needed. Shape assertions (``_guards_fn``, ``_assert_*``) are dropped: they pin exactly the
shapes that pruning changes.

Dim 0 of every input is the batch dim; it is dynamic when the program exported the first input's so (the
other inputs sharing that symbol stay dynamic with it). Outputs keep the program's structure (tuple, list,
dict: the output node is rebuilt from ``call_spec.out_spec``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from .. import io
from ..errors import ParityError, SlimError, UnsupportedModel
from ..shape_limits import check_input_shapes
from . import IMPORTERS, Imported
from .modularize import constant_path, modularize, mutates, packet
from .parity import check_parity
from .reshapes import BARRIER, unbake_chunks, unbake_views, unprunable_layers

aten = torch.ops.aten

# Checks of exported shapes/values; they would reject the pruned model, and carry no data.
_ASSERTS = {aten._assert_scalar, aten._assert_tensor_metadata, aten.sym_constrain_range,
            aten.sym_constrain_range_for_size, aten._assert_async}
_KEEP_META = ("stack_trace", "nn_module_stack", "lift_name", BARRIER)


@IMPORTERS.register("pt2")
def import_pt2(path: Path, input_shape: tuple[int, ...] | None) -> Imported:
    ep = load_program(path)
    src = ep.module()
    gm, x_vals = _rebuild(src, ep.call_spec.out_spec)
    batch = _batch_dim(ep, x_vals[0])
    given = io.as_shapes(input_shape)
    if given is not None and len(given) != len(x_vals):
        raise SlimError(f"the program takes {len(x_vals)} inputs but the spec gives {len(given)} shapes; give one "
                        "per input in input_shapes")
    hints = _example_shapes(ep)
    hints = hints if hints is not None and len(hints) == len(x_vals) else None
    shapes = check_input_shapes(tuple(_resolve_shape(v, None if given is None else given[i], batch,
                                                     hints[i] if hints else None) for i, v in enumerate(x_vals)),
                                "input_shape" if input_shape else "the program's input")
    if batch is not None:
        batch["inputs"] = [i for i, v in enumerate(x_vals) if v.dim() and isinstance(v.shape[0], torch.SymInt)
                           and str(v.shape[0].node.expr) == batch["symbol"]]
    n = _example_batch(batch, shapes[0][0])
    example = io.random_inputs(shapes, n)
    unbake_chunks(gm)
    unbake_views(gm)
    _strip_meta(gm)
    modularize(gm, example)
    gm.eval()
    blocked = unprunable_layers(gm)
    original = _Program(src, ep.call_spec.in_spec)
    sig = ep.module_call_graph[0].signature if ep.module_call_graph else None
    names = [str(a) for a in sig.forward_arg_names or []] if sig is not None else []
    if len(names) != len(shapes):
        names = [n.name for n in gm.graph.find_nodes(op="placeholder")]
    # "unprunable": module path -> why; the pruner must leave every group containing one whole.
    meta: dict[str, Any] = {"batch_dim": batch, "unprunable": blocked, "out_spec": ep.call_spec.out_spec}
    imported = Imported(module=gm, fmt="pt2", original=original, input_shape=shapes[0], input_name=names[0],
                        dynamic_batch=batch is not None, meta=meta, input_shapes=shapes, input_names=tuple(names))
    _check_parity(imported, src, example)
    return imported


def load_program(path: Path) -> torch.export.ExportedProgram:
    try:
        return torch.export.load(str(path))
    except Exception as e:  # torch raises many types for a bad archive; all mean the same to a user
        raise SlimError(f"not a readable torch.export (.pt2) program: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}"[:300]) from None


class _Program:
    """The uploaded program, run as uploaded (positional tensors in, its output structure out), no autograd."""

    def __init__(self, module: nn.Module, in_spec: Any) -> None:
        self.module = module
        self.in_spec = in_spec

    def __call__(self, *xs: torch.Tensor) -> Any:
        with torch.no_grad():
            if self.in_spec is None:
                return self.module(*xs)
            args, kwargs = pytree.tree_unflatten(list(xs), self.in_spec)
            return self.module(*args, **kwargs)


def _rebuild(src: fx.GraphModule, out_spec: Any = None) -> tuple[fx.GraphModule, list[torch.Tensor]]:
    """Copy ``src``'s graph onto a plain root; returns it and the inputs' exported FakeTensors.

    ``out_spec`` (the program's output pytree) gives the output its structure back; without it the
    graph returns the flat tuple of leaves (one tensor when there is one).
    """
    root = nn.Module()
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    placeholders = [n for n in src.graph.nodes if n.op == "placeholder"]
    if not placeholders:
        raise UnsupportedModel("the program takes no tensor inputs")
    x_vals = [p.meta.get("val") for p in placeholders]
    for p, v in zip(placeholders, x_vals, strict=True):
        if not isinstance(v, torch.Tensor):
            raise UnsupportedModel(f"the program's input {p.name} is not a tensor")
    for node in src.graph.nodes:
        if node.op == "call_module" and node.target == "_guards_fn":
            continue
        if node.op == "call_function" and packet(node.target) in _ASSERTS:
            continue
        if node.op == "get_attr":
            target = _copy_tensor(src, root, node)
        elif node.op == "output":
            graph.output(_outputs(node, env, out_spec))
            continue
        elif node.op not in ("placeholder", "call_function"):
            raise UnsupportedModel(f"node {node.name} ({node.op} {node.target}) is not supported in a .pt2 "
                                   "program")
        new = graph.node_copy(node, lambda a: env[a])
        new.meta["lift_name"] = node.name  # parity.first_divergence pairs nodes by it
        if new.op == "call_function":
            new.target = packet(new.target)
        elif new.op == "get_attr":
            new.target = target
        env[node] = new
    graph.eliminate_dead_code(is_impure_node=mutates)
    return fx.GraphModule(root, graph), x_vals  # type: ignore[return-value]


def _copy_tensor(src: nn.Module, root: nn.Module, node: fx.Node) -> str:
    """Copy the tensor ``node`` reads to ``consts.`` + its path on ``root``; returns the new path."""
    obj: Any = src
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, torch.Tensor):
        raise UnsupportedModel(f"node {node.name} reads {node.target}, a {type(obj).__name__}, not a tensor "
                               "(control flow and custom objects are not supported)")
    owner = root
    path = constant_path(str(node.target))
    *parents, leaf = path.split(".")
    for p in parents:
        child = owner._modules.get(p)
        if child is None:
            child = nn.Module()
            owner.add_module(p, child)
        owner = child
    owner.register_buffer(leaf, obj.detach().clone())
    return path


def _outputs(node: fx.Node, env: dict[fx.Node, fx.Node], out_spec: Any) -> Any:
    """The output node's argument: the program's leaves, in its structure when ``out_spec`` is known."""
    leaves = pytree.tree_leaves(node.args[0])
    if not leaves or any(not isinstance(a, fx.Node) for a in leaves):
        raise UnsupportedModel("the program returns values that are not tensors; supported: a tensor, or a "
                               "tuple, list or dict of tensors")
    for a in leaves:
        val = a.meta.get("val")
        if val is not None and not isinstance(val, torch.Tensor):
            raise UnsupportedModel(f"the program's output {a.name} is not a tensor")
    mapped = [env[a] for a in leaves]
    if out_spec is not None and out_spec.num_leaves == len(mapped):
        return pytree.tree_unflatten(mapped, out_spec)
    return mapped[0] if len(mapped) == 1 else tuple(mapped)


def _placeholder(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "placeholder")


def _batch_dim(ep: torch.export.ExportedProgram, x_val: torch.Tensor) -> dict[str, Any] | None:
    """Name/min/max of the input's batch dim when the program left it dynamic, else None."""
    if x_val.dim() == 0:
        return None
    b = x_val.shape[0]
    if not isinstance(b, torch.SymInt):
        return None
    expr = b.node.expr
    lo, hi = 1, None
    vr = ep.range_constraints.get(expr)
    if vr is not None:
        lo = max(int(vr.lower), 1) if _finite(vr.lower) else 1
        hi = int(vr.upper) if _finite(vr.upper) else None
    # torch.export keeps the symbol, not the user's Dim name; "batch" is what we export it as again.
    return {"name": "batch", "symbol": str(expr), "min": lo, "max": hi}


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _resolve_shape(x_val: torch.Tensor, given: tuple[int, ...] | None, batch: dict[str, Any] | None,
                   hints: tuple[int, ...] | None) -> tuple[int, ...]:
    """An input's shape to use: batch 1 when dynamic, the rest from the program (or checked against it)."""
    dims: list[int | None] = []
    for i, d in enumerate(x_val.shape):
        if isinstance(d, int):
            dims.append(d)
        else:
            dims.append(None if given is not None or hints is None else hints[i])
    if batch is not None:
        dims[0] = 1
    if given is None:
        if any(d is None for d in dims):
            raise SlimError("the program has dynamic input dims other than the batch; give input_shape")
        return tuple(int(d) for d in dims)  # type: ignore[arg-type]
    mismatch = any(d is not None and g != d for g, d in zip(given[1:], dims[1:], strict=False))
    if len(given) != len(dims) or mismatch:
        want = ", ".join("?" if d is None else str(d) for d in dims[1:])
        raise SlimError(f"input_shape {tuple(given)} does not match the program's input (batch, {want})")
    return (dims[0] if dims[0] is not None else 1, *(int(g) for g in given[1:]))


def _example_shapes(ep: torch.export.ExportedProgram) -> list[tuple[int, ...]] | None:
    try:
        args = ep.example_inputs
    except Exception:
        return None
    leaves = [t for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor)] if args else []
    return [tuple(t.shape) for t in leaves] or None


def _example_batch(batch: dict[str, Any] | None, static: int) -> int:
    """Batch 2 for dynamic programs (batch 1 can hide batch-mixing bugs) when the range allows it."""
    if batch is None:
        return static
    hi = batch["max"] if batch["max"] is not None else 2
    return max(batch["min"], min(2, hi))


def _strip_meta(gm: fx.GraphModule) -> None:
    """Drop exported FakeTensors: they describe the unpruned shapes and pin a fake mode in memory."""
    for n in gm.graph.nodes:
        n.meta = {k: v for k, v in n.meta.items() if k in _KEEP_META}


def _check_parity(imported: Imported, src: fx.GraphModule, example: io.Inputs) -> None:
    try:
        check_parity(imported.original, imported.module, example, rtol=1e-5, stage="pt2 import")
    except ParityError:
        # Again with the plain copy of the program as reference, so the error names the first bad node.
        ref, _ = _rebuild(src, None)
        _strip_meta(ref)
        check_parity(imported.original, imported.module, example, rtol=1e-5, stage="pt2 import",
                     reference=ref)
        raise
