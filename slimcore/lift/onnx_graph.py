"""The ONNX lifter with every op converter registered: what importers and tests call.

:mod:`.onnx_lift` holds the core (value kinds, the ``OPS`` registry, :class:`~.onnx_lift.Lifter`) and
imports no converter; the converter modules (:mod:`.onnx_ops`, :mod:`.onnx_shapes`, :mod:`.onnx_pool`,
:mod:`.onnx_reduce`, :mod:`.onnx_scatter`) import the core and register themselves; this module imports them
all. Imports run one way only.
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx
import torch
import torch.fx as fx

from . import onnx_ops, onnx_pool, onnx_reduce, onnx_scatter, onnx_shapes  # noqa: F401  (importing registers the converters)
from .onnx_lift import MAX_OPSET, MIN_OPSET, OPS, Lifter


def supported_ops() -> list[str]:
    """The ONNX op types with a converter."""
    return sorted(OPS)


def lift_graph(model: onnx.ModelProto, example_inputs: Mapping[str, torch.Tensor]) -> fx.GraphModule:
    """Lift any ONNX graph (several inputs, weights as inputs, several outputs) into an fx graph of aten calls.

    The lower-level entry point used by the importer and by the op-level tests: no modularization, no
    reshape fencing, no parity; Conv/Gemm with weights that are graph inputs stay ``call_function``.
    Placeholders follow the order of the graph's non-initializer inputs.
    """
    return Lifter(model, example_inputs).run()


__all__ = ["MAX_OPSET", "MIN_OPSET", "Lifter", "lift_graph", "supported_ops"]
