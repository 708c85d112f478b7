"""``torch.export`` out: re-export the pruned lifted graph, save it, reload it, and check it.

The lifted graph already computes every size at run time, so re-exporting it with the upload's dynamic
batch dim gives a program that accepts the same batch range as the one the user sent. The input keeps
the upload's name (it is the placeholder and ``forward_arg_names`` that serving code and graph viewers
show); a GraphModule takes that name from its placeholder, hence a renamed shallow copy rather than a
wrapper module, which would also prefix every parameter name. It stays positional, as in the upload; so
do several inputs (each keeps its name; dim 0 of those that shared the upload's batch symbol stays that
one dim), and the output keeps its tuple/list/dict structure.
The reload check runs at two batch sizes because a program that specialized the batch passes at one.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from .. import io
from ..errors import ParityError
from ..lift import Imported
from . import EXPORTERS


@EXPORTERS.register("pt2")
def export_pt2(module: nn.Module, imported: Imported, out: Path, example: io.Inputs) -> None:
    module = module.cpu().float().eval()
    example = io.apply(example, lambda t: t.cpu().float())
    batch: dict[str, Any] | None = imported.meta.get("batch_dim") if imported.dynamic_batch else None
    if imported.dynamic_batch and batch is None:  # another importer's model: any batch from 1 up
        batch = {"name": "batch", "min": 1, "max": None}
    target = _with_input_names(module, list(imported.input_names))
    lo, hi = (int(batch.get("min") or 1), batch.get("max")) if batch else (0, None)
    if batch:
        checks = [_at_batch(example, _clamp(2, lo, hi)), _at_batch(example, _clamp(5, lo, hi))]
    else:  # a static batch must stay the upload's, whatever batch the caller's example has
        checks = [_at_batch(example, imported.input_shape[0] if imported.input_shape else io.num_rows(example))]
    # torch.export specializes a batch of 1 to a constant, so trace at batch 2 when it is dynamic
    trace_x = checks[0]
    n_in = len(io.args(example))
    dim = torch.export.Dim(str(batch.get("name") or "batch"), min=lo, max=hi) if batch else None
    shared = batch.get("inputs", range(n_in)) if batch else ()
    dynamic = tuple({0: dim} if i in shared else None for i in range(n_in)) if batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ep = torch.export.export(target, io.args(trace_x), dynamic_shapes=dynamic)
        except Exception as e:
            raise ParityError(f"could not write a .pt2 program: torch.export failed: {_first_line(e)}") from None
        _output_spec_as_uploaded(ep, imported.meta.get("out_spec"))
        torch.export.save(ep, str(out))
        reloaded = torch.export.load(str(out)).module()
    with torch.no_grad():
        for xb in checks:
            got, want = io.call(reloaded, xb), io.call(module, xb)
            if io.structure(got) != io.structure(want):
                raise ParityError(f"exported .pt2 program returns {io.describe(got)}, the pruned model "
                                  f"{io.describe(want)}")
            err = io.rel_error(got, want)
            if err > 1e-4:
                raise ParityError(f"exported .pt2 program differs from the pruned model at batch "
                                  f"{io.num_rows(xb)} (relative error {err:.2e} > 1e-4)")


def _with_input_names(module: nn.Module, names: list[str]) -> nn.Module:
    """``module`` itself, or for a GraphModule a copy sharing its weights whose inputs are called ``names``."""
    if not isinstance(module, fx.GraphModule) or not all(n.isidentifier() for n in names) \
            or len(set(names)) != len(names):
        return module
    placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(names) or [p.target for p in placeholders] == names:
        return module
    given = iter(names)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in module.graph.nodes:
        if node.op == "output":
            graph.output(fx.map_arg(node.args[0], lambda a: env[a]))
        elif node.op == "placeholder":
            env[node] = graph.placeholder(next(given))
        else:
            env[node] = graph.node_copy(node, lambda a: env[a])
    copy = fx.GraphModule(module, graph)
    copy.train(module.training)
    return copy


def _output_spec_as_uploaded(ep: torch.export.ExportedProgram, upload: Any) -> None:
    """Make the program return the upload's containers: a non-strict export of a GraphModule records fx's
    ``immutable_dict``/``immutable_list`` (its output node's) as the output types. ``upload`` is the
    uploaded program's output spec (a .pt2 upload: e.g. torchvision's ``OrderedDict``); it is used when it
    has the same form, else the containers become plain ``dict``/``list``."""
    sig = ep.module_call_graph[0].signature if ep.module_call_graph else None
    if sig is None or sig.out_spec is None:
        return
    spec = sig.out_spec
    dummy = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
    fixed = pytree.tree_structure(io.plain(dummy))
    if upload is not None and upload.num_leaves == spec.num_leaves:
        theirs = pytree.tree_unflatten(list(range(spec.num_leaves)), upload)
        if io.structure(theirs) == io.structure(dummy):
            fixed = upload
    if fixed != spec:
        sig.out_spec = fixed


def _clamp(n: int, lo: int, hi: int | None) -> int:
    return max(lo, n if hi is None else min(n, int(hi)))


def _at_batch(x: io.Inputs, n: int) -> io.Inputs:
    """``x`` (each input) with ``n`` rows: its own rows first, then seeded noise of the same shape."""
    def one(t: torch.Tensor) -> torch.Tensor:
        if t.shape[0] >= n:
            return t[:n].contiguous()
        extra = torch.randn((n - t.shape[0], *t.shape[1:]), generator=torch.Generator().manual_seed(1))
        return torch.cat([t, extra.to(t.dtype)])

    return io.pack([one(t) for t in io.args(x)])


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]
