"""``torch.export`` out: re-export the pruned lifted graph, save it, reload it, and check it.

The lifted graph already computes every size at run time, so re-exporting it with the upload's dynamic
batch dim gives a program that accepts the same batch range as the one the user sent. The input keeps
the upload's name (it is the placeholder and ``forward_arg_names`` that serving code and graph viewers
show); a GraphModule takes that name from its placeholder, hence a renamed shallow copy rather than a
wrapper module, which would also prefix every parameter name. It stays positional, as in the upload.
The reload check runs at two batch sizes because a program that specialized the batch passes at one.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..errors import ParityError
from ..lift import Imported
from . import EXPORTERS, rel_error


@EXPORTERS.register("pt2")
def export_pt2(module: nn.Module, imported: Imported, out: Path, example: torch.Tensor) -> None:
    module = module.cpu().float().eval()
    example = example.cpu().float()
    batch: dict[str, Any] | None = imported.meta.get("batch_dim") if imported.dynamic_batch else None
    if imported.dynamic_batch and batch is None:  # another importer's model: any batch from 1 up
        batch = {"name": "batch", "min": 1, "max": None}
    target = _with_input_name(module, imported.input_name)
    lo, hi = (int(batch.get("min") or 1), batch.get("max")) if batch else (0, None)
    if batch:
        checks = [_at_batch(example, _clamp(2, lo, hi)), _at_batch(example, _clamp(5, lo, hi))]
    else:  # a static batch must stay the upload's, whatever batch the caller's example has
        checks = [_at_batch(example, imported.input_shape[0] if imported.input_shape else example.shape[0])]
    # torch.export specializes a batch of 1 to a constant, so trace at batch 2 when it is dynamic
    trace_x = checks[0]
    dynamic = ({0: torch.export.Dim(str(batch.get("name") or "batch"), min=lo, max=hi)},) if batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ep = torch.export.export(target, (trace_x,), dynamic_shapes=dynamic)
        except Exception as e:
            raise ParityError(f"could not write a .pt2 program: torch.export failed: {_first_line(e)}") from None
        torch.export.save(ep, str(out))
        reloaded = torch.export.load(str(out)).module()
    with torch.no_grad():
        for xb in checks:
            err = rel_error(reloaded(xb), module(xb))
            if err > 1e-4:
                raise ParityError(f"exported .pt2 program differs from the pruned model at batch {xb.shape[0]} "
                                  f"(relative error {err:.2e} > 1e-4)")


def _with_input_name(module: nn.Module, name: str) -> nn.Module:
    """``module`` itself, or for a GraphModule a copy sharing its weights whose input is called ``name``."""
    if not isinstance(module, fx.GraphModule) or not name.isidentifier():
        return module
    placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1 or placeholders[0].target == name:
        return module
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in module.graph.nodes:
        if node.op == "output":
            graph.output(fx.map_arg(node.args[0], lambda a: env[a]))
        elif node.op == "placeholder":
            env[node] = graph.placeholder(name)
        else:
            env[node] = graph.node_copy(node, lambda a: env[a])
    copy = fx.GraphModule(module, graph)
    copy.train(module.training)
    return copy


def _clamp(n: int, lo: int, hi: int | None) -> int:
    return max(lo, n if hi is None else min(n, int(hi)))


def _at_batch(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x`` with ``n`` rows: its own rows first, then seeded noise of the same shape."""
    if x.shape[0] >= n:
        return x[:n].contiguous()
    extra = torch.randn((n - x.shape[0], *x.shape[1:]), generator=torch.Generator().manual_seed(1))
    return torch.cat([x, extra.to(x.dtype)])


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]
