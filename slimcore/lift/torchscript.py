"""Lift a TorchScript file (scripted or traced) into a prunable fx graph.

A ScriptModule hides its layers behind ``prim::CallMethod`` and keeps training-only branches, so
neither Torch-Pruning nor our regularizers can see it. Freezing an eval-mode copy inlines every call and
folds ``self.training`` without folding BatchNorm away (``torch.jit.freeze``'s optimizations would fold
it, destroying the very γ we prune on). :mod:`.ts_translate` then rewrites each node one to one as a
``torch.ops.aten`` packet call, so the lifted model runs the same kernels as the original and scripts
again at export, with size arithmetic as live fx nodes (never values read off the example) so reshapes
follow pruned widths and any batch size. ``modularize`` finally turns the weight-owning calls into
``nn`` modules.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from .. import io
from ..errors import SlimError, UnsupportedModel
from ..shape_limits import check_input_shapes
from . import IMPORTERS, Imported
from .modularize import modularize
from .parity import check_parity
from .reshapes import unbake_chunks, unbake_views, unprunable_layers
from .ts_translate import Lifter

_REPORTS = {"prim::RaiseException", "aten::warn"}


class _Original:
    """The uploaded ScriptModule, untouched, run the way parity and distillation need it."""

    def __init__(self, module: torch.jit.ScriptModule) -> None:
        self.module = module.eval()

    def __call__(self, *xs: torch.Tensor) -> Any:
        with torch.no_grad():
            return self.module(*xs)


def _first_line(e: BaseException) -> str:
    return ((str(e).strip().splitlines() or [type(e).__name__])[0].strip())[:200]


def _freeze(module: torch.jit.ScriptModule, ranks: list[int]) -> torch.jit.ScriptModule:
    """Inline an eval-mode copy, folding ``self.training`` and plain attributes into constants.

    Parameters and buffers stay attributes (``preserveParameters``): making them graph constants makes
    freezing an order of magnitude slower on deep nets, and ``prim::GetAttr`` chains name them anyway.

    Scripted library code branches and loops on ``x.dim()`` (``F.interpolate``, BatchNorm's checks).
    Each input's rank is fixed by the spec and survives pruning and any batch size, so it is declared on
    the graph inputs (and each parameter's on its read) and propagated; the branches and loops it decides
    then fold away. Sizes stay unknown, so nothing that depends on them is baked.
    """
    try:
        frozen = torch.jit._recursive.wrap_cpp_module(torch._C._freeze_module(module._c, [], True, True))
    except RuntimeError as e:
        raise UnsupportedModel(f"cannot freeze the TorchScript module: {_first_line(e)}") from None
    graph = frozen.forward.graph
    torch._C._jit_pass_inline(graph)
    torch._C._jit_pass_constant_propagation(graph)
    this, *xs = list(graph.inputs())
    if len(xs) == len(ranks) and all(x.type().kind() == "TensorType" for x in xs):
        for x, rank in zip(xs, ranks, strict=True):
            x.setType(torch._C.TensorType.get().with_sizes([None] * rank))
        owners: dict[int, Any] = {this.unique(): frozen}
        for n in graph.nodes():
            if n.kind() == "prim::GetAttr" and n.input().unique() in owners:
                val = getattr(owners[n.input().unique()], n.s("name"), None)
                if isinstance(val, torch.jit.ScriptModule):
                    owners[n.output().unique()] = val
                elif isinstance(val, torch.Tensor) and n.output().type().kind() == "TensorType":
                    n.output().setType(torch._C.TensorType.get().with_sizes([None] * val.dim()))
        try:
            torch._C._jit_pass_propagate_shapes_on_graph(graph)
        except RuntimeError:
            pass  # ranks stay unknown; whatever branches on them is reported as unsupported
        torch._C._jit_pass_peephole(graph, False)
        torch._C._jit_pass_constant_propagation(graph)
        torch._C._jit_pass_loop_unrolling(graph)
        torch._C._jit_pass_constant_propagation(graph)
    _strip_guards(graph.block())
    torch._C._jit_pass_dce(graph)
    _refuse_training_mode(graph)
    return frozen


def _refuse_training_mode(graph: torch._C.Graph) -> None:
    """A model traced before ``.eval()`` has ``training=True`` baked into every BatchNorm call.

    Its file normalises with batch statistics and updates its running statistics on every call, so
    there is no fixed function to lift or compare against (ultralytics and timm models are built in
    training mode; forgetting ``.eval()`` before ``torch.jit.trace`` is common).
    """
    for n in graph.nodes():
        if n.kind() != "aten::batch_norm" or n.inputsAt(3).type().kind() == "NoneType":
            continue  # without running statistics (track_running_stats=False) batch statistics are the model
        if n.inputsAt(5).node().kind() == "prim::Constant" and n.inputsAt(5).toIValue() is True:
            raise UnsupportedModel(f"BatchNorm node %{n.output().debugName()} runs in training mode (batch "
                                   "statistics): the model was traced before .eval(); trace model.eval() again")


def _strip_guards(block: torch._C.Block) -> None:
    """Remove ``if bad: raise`` input checks: they never fire on inputs the model accepts.

    Their conditions (often shape tests such as ``x.size(1) != 3``) then die, so DCE drops the branching
    that would otherwise block the lift.
    """
    for n in list(block.nodes()):
        for b in n.blocks():
            _strip_guards(b)
        if n.kind() == "prim::If" and n.outputsSize() == 0:
            reports = [any(m.kind() in _REPORTS for m in b.nodes()) for b in n.blocks()]
            if any(reports) and all(r or not list(b.nodes()) for r, b in zip(reports, n.blocks(), strict=True)):
                n.destroy()


class _Shapes(fx.Interpreter):
    """Record each node's output shape as ``meta["val"]`` (meta tensors), as torch.export would."""

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            n.meta["val"] = torch.empty(out.shape, dtype=out.dtype, device="meta")
        elif isinstance(out, list | tuple) and out and all(isinstance(t, torch.Tensor) for t in out):
            n.meta["val"] = [torch.empty(t.shape, dtype=t.dtype, device="meta") for t in out]
        return out


def _fence_reshapes(gm: fx.GraphModule, example: io.Inputs) -> None:
    """Give chunks and channel-mixing reshapes the same treatment as in the pt2 importer.

    Sizes are already live here, but Torch-Pruning 1.6.1 still cannot build a dependency graph through
    ``chunk`` or a channel shuffle, so :mod:`.reshapes` rewrites those (reading shapes from
    ``meta["val"]``, which an example run provides) and marks the layers feeding a shuffle unprunable.
    """
    with torch.no_grad():
        _Shapes(gm).run(*io.args(example))
    unbake_chunks(gm)
    unbake_views(gm)
    for n in gm.graph.nodes:
        n.meta.pop("val", None)


def _tensors_only(t: Any) -> bool:
    """A tensor, or a tuple/list/dict (string keys) of such: the outputs every later stage can compare."""
    kind = t.kind()
    if kind == "TensorType":
        return True
    if kind in ("TupleType", "ListType"):
        return all(_tensors_only(e) for e in t.containedTypes())
    if kind == "DictType":
        return t.getKeyType().kind() == "StringType" and _tensors_only(t.getValueType())
    return False


def _check_signature(module: torch.jit.ScriptModule) -> int:
    """Tensors in; a tensor or a tuple/list/dict of tensors out. Returns the number of inputs."""
    try:
        schema = module.forward.schema
    except (AttributeError, RuntimeError):
        raise UnsupportedModel("the TorchScript module has no forward method") from None
    args, rets = schema.arguments[1:], schema.returns
    if not args or any(a.type.kind() != "TensorType" for a in args):
        sig = ", ".join(f"{a.name}: {a.type}" for a in args)
        raise UnsupportedModel(f"forward({sig}) must take tensor inputs only")
    if len(rets) != 1 or not _tensors_only(rets[0].type):
        kinds = ", ".join(str(r.type) for r in rets)
        # torchvision's scripted GoogLeNet/Inception return a NamedTuple whose aux outputs are None in eval
        hint = ("; a named tuple or an optional output cannot be rebuilt: save the model with torch.jit.trace or "
                "torch.export instead, which keep the tensors it returns") \
            if "__torch__" in kinds or "Optional" in kinds or "None" in kinds else ""
        raise UnsupportedModel(f"forward returns {kinds}; supported: a tensor, or a tuple, list or dict "
                               f"(string keys) of tensors{hint}")
    return len(args)


@IMPORTERS.register("torchscript")
def import_torchscript(path: Path, input_shape: tuple[int, ...] | None) -> Imported:
    if input_shape is None:
        raise SlimError("input_shape is required for TorchScript models: the file does not record one "
                        "(give e.g. [1, 3, 224, 224]; input_shapes, one per input, for several inputs; with .npz "
                        "data of one input, x's sample shape is taken when the spec gives none)")
    shapes = io.as_shapes(input_shape) or ()
    if not shapes or any(not s or any(d <= 0 for d in s) for s in shapes):
        raise SlimError(f"input_shape {[list(s) for s in shapes]} must be non-empty with positive sizes")
    check_input_shapes(shapes, "input_shape")
    try:
        original = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # RuntimeError/ValueError/OSError with multi-line C++ text
        raise SlimError(f"{Path(path).name} is not a loadable TorchScript file: {_first_line(e)}") from None
    n_inputs = _check_signature(original)
    if len(shapes) != n_inputs:
        raise SlimError(f"the model takes {n_inputs} inputs but the spec gives {len(shapes)} shapes; give one "
                        "per input in input_shapes")
    work = copy.deepcopy(original).eval()
    runner = _Original(original)
    example = io.random_inputs(shapes, 2)
    try:
        io.call(runner, example)
    except Exception as e:
        given = ", ".join(str(list(t.shape)) for t in io.args(example))
        what = "an input" if len(shapes) == 1 else "inputs"
        raise SlimError(f"the model fails on {what} of shape {given}: {_first_line(e)}") from None
    frozen = _freeze(work, [len(s) for s in shapes])
    gm = Lifter(frozen).run()
    _fence_reshapes(gm, example)
    modularize(gm, example)
    gm.eval()
    # the op-level graph (before modularize) localises a parity failure; only built if one happens
    check_parity(runner, gm, example, stage="import", reference=lambda: Lifter(frozen).run())
    # "unprunable": module path -> why; the pruner must leave every group containing one whole.
    meta: dict[str, Any] = {"unprunable": unprunable_layers(gm), "forward_schema": str(original.forward.schema)}
    names = tuple(str(p.target) for p in gm.graph.find_nodes(op="placeholder"))
    return Imported(module=gm, fmt="torchscript", original=runner, input_shape=shapes[0], input_name=names[0],
                    dynamic_batch=True, meta=meta, input_shapes=shapes, input_names=names)
