"""TorchScript out: script the pruned lifted graph, save, reload, and check it before calling it done.

The lifted graph calls aten overload packets, which TorchScript resolves, so ``torch.jit.script`` keeps
the run-time size computations (a flatten or view stays valid for any batch). Tracing is only a
fallback, and the reload check at a second batch size catches a trace that baked the batch in. Several
inputs stay positional arguments with the upload's names; a tuple/list/dict output keeps its structure
(the lifted graph returns it as the upload did, and scripting infers the same return type).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from .. import io
from ..errors import ParityError
from ..lift import Imported
from . import EXPORTERS


@EXPORTERS.register("torchscript")
def export_torchscript(module: nn.Module, imported: Imported, out: Path, example: io.Inputs) -> None:
    module = module.cpu().float().eval()
    example = io.apply(example, lambda t: t.cpu().float())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            scripted = torch.jit.script(module)
        except Exception as script_err:  # fall back to tracing; the checks below decide
            try:
                scripted = torch.jit.trace(module, io.args(example), strict=False)
            except Exception as trace_err:
                raise ParityError(f"could not write TorchScript: scripting failed ({script_err!s:.200}); "
                                  f"tracing failed ({trace_err!s:.200})") from None
        torch.jit.save(scripted, str(out))
        reloaded = torch.jit.load(str(out), map_location="cpu").eval()
    batches = [example] if not imported.dynamic_batch else [example, _other_batch(example)]
    with torch.no_grad():
        for xb in batches:
            got, want = io.call(reloaded, xb), io.call(module, xb)
            if io.structure(got) != io.structure(want):
                raise ParityError(f"exported TorchScript returns {io.describe(got)}, the pruned model "
                                  f"{io.describe(want)}")
            err = io.rel_error(got, want)
            if err > 1e-4:
                raise ParityError(f"exported TorchScript differs from the pruned model at batch {io.num_rows(xb)} "
                                  f"(relative error {err:.2e} > 1e-4)")


def _other_batch(x: io.Inputs) -> io.Inputs:
    n = 5 if io.num_rows(x) != 5 else 3
    return io.random_inputs([tuple(t.shape) for t in io.args(x)], n, seed=1)
