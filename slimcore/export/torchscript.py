"""TorchScript out: script the pruned lifted graph, save, reload, and check it before calling it done.

The lifted graph calls aten overload packets, which TorchScript resolves, so ``torch.jit.script`` keeps
the run-time size computations (a flatten or view stays valid for any batch). Tracing is only a
fallback, and the reload check at a second batch size catches a trace that baked the batch in.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import ParityError
from ..lift import Imported
from . import EXPORTERS, rel_error


@EXPORTERS.register("torchscript")
def export_torchscript(module: nn.Module, imported: Imported, out: Path, example: torch.Tensor) -> None:
    module = module.cpu().float().eval()
    example = example.cpu().float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            scripted = torch.jit.script(module)
        except Exception as script_err:  # fall back to tracing; the checks below decide
            try:
                scripted = torch.jit.trace(module, example)
            except Exception as trace_err:
                raise ParityError(f"could not write TorchScript: scripting failed ({script_err!s:.200}); "
                                  f"tracing failed ({trace_err!s:.200})") from None
        torch.jit.save(scripted, str(out))
        reloaded = torch.jit.load(str(out), map_location="cpu").eval()
    batches = [example] if not imported.dynamic_batch else [example, _other_batch(example)]
    with torch.no_grad():
        for xb in batches:
            err = rel_error(reloaded(xb), module(xb))
            if err > 1e-4:
                raise ParityError(f"exported TorchScript differs from the pruned model at batch {xb.shape[0]} "
                                  f"(relative error {err:.2e} > 1e-4)")


def _other_batch(x: torch.Tensor) -> torch.Tensor:
    n = 5 if x.shape[0] != 5 else 3
    return torch.randn((n, *x.shape[1:]), generator=torch.Generator().manual_seed(1))
