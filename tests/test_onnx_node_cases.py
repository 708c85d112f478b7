"""ONNX's own operator test cases, run through the lifter (``lift_graph``) and compared with ONNX's outputs.

Where the cases come from: ONNX ships them as ``onnx/backend/test/data/node/test_*/model.onnx`` with
``test_data_set_0/{input,output}_*.pb``, and those files are used when present. The onnx 1.23 wheel
installed here does not contain that folder, so the same cases are generated from the modules of
``onnx.backend.test.case.node`` (each ``expect(...)`` there records the model, its inputs and the reference
outputs the data files are written from). One test per converter: it runs every case of that op's module
(including the ``_expanded`` function-body variants), with rtol = atol = 1e-4.

Inputs that exporters always emit as constants (shapes, axes, pads, slice bounds, split sizes, Resize
scales/sizes, Clip bounds, Range bounds, Dropout's ratio/mode, GatherND indices) are turned into
initializers, as the lifter reads them at import time; data inputs stay graph inputs, so Conv/Gemm with
weights as inputs run as plain calls. Models at opsets outside 11-25 are moved into that range when the
op's version is the same there (And/Or/Not are opset-7 ops; Range and Cast got versions 27/28 that only
add types), else skipped.

Skipped on purpose (``SKIPS`` below, each with its reason): element types torch cannot hold or compute
with here (float8/float4/int4/int2/uint2/float6/e8m0, bfloat16 via numpy, strings, uint16/32/64);
training-mode BatchNormalization and Dropout; Dropout's mask and MaxPool's Indices outputs; dilated
AveragePool (no PyTorch kernel); GatherND with ``batch_dims``; ScatterND's mul/max/min reductions;
Resize with cubic mode, antialiasing,
``tf_crop_and_resize``, ``keep_aspect_ratio_policy``, linear ``half_pixel_symmetric``, linear
``pytorch_half_pixel`` to a length of 1 and linear ``align_corners`` with a fractional scaled length;
ReduceMax/ReduceMin over an empty set; expanded forms that use ops the lifter does not support (Erf in
Gelu, Loop in Range).
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from slimcore.errors import UnsupportedModel
from slimcore.lift.onnx_graph import MAX_OPSET, MIN_OPSET, lift_graph, supported_ops

torch.set_num_threads(1)
OPS = set(supported_ops())

SKIPS = {
    r"FLOAT8|FLOAT4|INT4|UINT4|INT2|UINT2|E8M0|FLOAT6|BFLOAT16|bfloat16|STRING|_string": "element type not supported",
    r"uint(16|32|64)": "unsigned 16/32/64-bit integers: torch has no kernels for most ops on them",
    r"training_mode|^test_training_dropout": "training-mode BatchNormalization/Dropout (lifted graphs are inference)",
    r"dropout_default_mask": "Dropout's mask output is not supported",
    r"with_argmax": "MaxPool's Indices output is not supported",
    r"^test_averagepool_.*dilations": "dilated AveragePool has no PyTorch kernel",
    r"batch_dim1": "GatherND with batch_dims > 0 is not supported",
    r"^test_scatternd_(multiply|max|min)": "ScatterND reductions mul/max/min are refused (index_put only sets or adds)",
    r"^test_resize_.*(cubic|antialias|tf_crop|not_larger|not_smaller|half_pixel_symmetric)":
        "Resize mode/option not supported",
    r"^test_resize_downsample_scales_linear_align_corners$": "linear align_corners to a fractional scaled length",
    r"^test_resize_downsample_sizes_linear_pytorch_half_pixel$": "linear pytorch_half_pixel to a length of 1",
    r"^test_reduce_(max|min)_empty_set": "max/min over an empty set",
    r"^test_gelu_default_\d_expanded$": "the expanded form uses Erf, which is not supported",
    r"^test_range_.*_expanded$": "the expanded form uses Loop, which is not supported",
}
# formal input names (from the op schemas) the lifter needs as constants
PARAMS = {"shape", "axes", "pads", "starts", "ends", "steps", "split", "sizes", "scales", "roi", "repeats", "min",
          "max", "constant_value", "start", "limit", "delta", "ratio", "training_mode"}
_MODULE_ALIASES = {"BatchNormalization": "batch_normalization", "Range": "rangeop", "LessOrEqual": "less_or_equal",
                   "GreaterOrEqual": "greater_or_equal"}
_DATA = Path(onnx.__file__).parent / "backend" / "test" / "data" / "node"


def _modules() -> list[str]:
    import onnx.backend.test.case.node as cases

    have = {m.name for m in pkgutil.iter_modules(cases.__path__)}
    found = set()
    for op in OPS:
        for cand in (_MODULE_ALIASES.get(op, ""), op.lower(), op.lower() + "_"):
            if cand in have:
                found.add(cand)
                break
    return sorted(found)


_CACHE: dict[str, list[tuple[str, onnx.ModelProto, list[Any], list[Any]]]] = {}


def _cases(module: str) -> list[tuple[str, onnx.ModelProto, list[Any], list[Any]]]:
    """(name, model, inputs, outputs) of one case module, from the data folder if shipped, else generated."""
    if module in _CACHE:
        return _CACHE[module]
    import onnx.backend.test.case.node as cases

    before = len(cases._NodeTestCases)
    importlib.import_module(f"onnx.backend.test.case.node.{module}")
    got = []
    for c in cases._NodeTestCases[before:]:
        folder = _DATA / c.name
        if (folder / "model.onnx").exists():
            got.append(_from_folder(folder))
        else:
            ins, outs = c.data_sets[0]
            got.append((c.name, c.model, list(ins), list(outs)))
    _CACHE[module] = got
    return got


def _from_folder(folder: Path) -> tuple[str, onnx.ModelProto, list[Any], list[Any]]:
    def read(kind: str) -> list[Any]:
        files = sorted((folder / "test_data_set_0").glob(f"{kind}_*.pb"), key=lambda p: int(p.stem.split("_")[1]))
        return [onnx.numpy_helper.to_array(onnx.TensorProto.FromString(p.read_bytes())) for p in files]

    return folder.name, onnx.load(str(folder / "model.onnx")), read("input"), read("output")


def _skip_reason(name: str) -> str | None:
    return next((why for pat, why in SKIPS.items() if re.search(pat, name)), None)


def _prepare(model: onnx.ModelProto, inputs: list[Any]) -> tuple[onnx.ModelProto, dict[str, torch.Tensor]]:
    """Move the opset into the supported range where the ops are the same there; constants as initializers."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for o in m.opset_import:
        if o.domain in ("", "ai.onnx"):
            v = min(max(o.version, MIN_OPSET), MAX_OPSET)
            for n in m.graph.node:
                if onnx.defs.get_schema(n.op_type, v).since_version != \
                        onnx.defs.get_schema(n.op_type, o.version).since_version:
                    pytest.skip(f"needs {n.op_type} of opset {o.version}")
            o.version = v
    formal = {}
    for n in m.graph.node:
        schema = onnx.defs.get_schema(n.op_type, m.opset_import[0].version, n.domain)
        for i, name in enumerate(n.input):
            if i < len(schema.inputs):
                formal.setdefault(name, set()).add(schema.inputs[i].name)
            if n.op_type == "GatherND" and i == 1 or n.op_type == "ConstantOfShape":
                formal.setdefault(name, set()).add("shape")
    example: dict[str, torch.Tensor] = {}
    for vi, value in zip(list(m.graph.input), inputs, strict=False):
        arr = _array(value)
        if formal.get(vi.name, set()) & PARAMS:
            m.graph.initializer.append(onnx.numpy_helper.from_array(arr, vi.name))
        else:
            example[vi.name] = torch.from_numpy(arr.copy())
    return m, example


def _array(v: Any) -> np.ndarray:
    """Case data are numpy arrays, or TensorProtos for types numpy lacks (the Cast cases)."""
    return onnx.numpy_helper.to_array(v) if isinstance(v, onnx.TensorProto) else np.asarray(v)


def _check(name: str, model: onnx.ModelProto, inputs: list[Any], outputs: list[Any]) -> None:
    m, example = _prepare(model, inputs)
    gm = lift_graph(m, example)
    got = gm(*example.values())
    got = got if isinstance(got, tuple) else (got,)
    assert len(got) == len(outputs), name
    for g, w in zip(got, outputs, strict=True):
        want = torch.from_numpy(_array(w).copy())
        assert (g.shape, g.dtype) == (want.shape, want.dtype), f"{name}: {g.shape} {g.dtype} != {want.dtype}"
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-4, equal_nan=True, msg=lambda m: f"{name}: {m}")


def _run(module: str) -> Iterator[tuple[str, str | None]]:
    """Check each case of ``module``; yields (name, skip reason or None)."""
    for name, model, ins, outs in _cases(module):
        if not {n.op_type for n in model.graph.node} <= set(OPS) or _skip_reason(name):
            yield name, _skip_reason(name) or "uses an unsupported op"
            continue
        try:
            _check(name, model, ins, outs)
        except pytest.skip.Exception as e:
            yield name, str(e)
            continue
        except UnsupportedModel as e:
            raise AssertionError(f"{name}: {e}") from None
        yield name, None


@pytest.mark.parametrize("module", _modules())
def test_onnx_node_cases(module: str) -> None:
    results = list(_run(module))
    if results and all(why is not None for _, why in results):
        pytest.skip("; ".join(sorted({f"{why}" for _, why in results})))
    assert results, f"no test cases in {module}"


# Skips where the model itself is fine for the lifter to read: it must refuse them with a clear error.
_REFUSED = {why for pat, why in SKIPS.items() if not re.search("element type|unsigned", why)}


@pytest.mark.parametrize("module", ["averagepool", "batch_normalization", "dropout", "gathernd", "maxpool", "resize",
                                    "reducemax", "gelu", "rangeop"])
def test_skipped_cases_are_refused_clearly(module: str) -> None:
    """Unsupported attributes/outputs are refused with an UnsupportedModel naming the node, never lifted wrongly."""
    refused = 0
    for name, model, ins, _ in _cases(module):
        if _skip_reason(name) not in _REFUSED:
            continue
        try:
            m, example = _prepare(model, ins)
        except pytest.skip.Exception:
            continue
        with pytest.raises(UnsupportedModel, match=r"node '|unsupported ONNX op|output \d"):
            lift_graph(m, example)
        refused += 1
    assert refused


@pytest.mark.parametrize("module", ["conv", "convtranspose", "averagepool", "maxpool", "resize", "reshape", "slice",
                                    "split", "pad", "gather", "shape", "softmax", "clip", "expand", "reducemean"])
def test_lifted_cases_script(module: str) -> None:
    """Every converter's output stays ``torch.jit.script``-able (exporters re-script the pruned model)."""
    for name, model, ins, _ in _cases(module):
        if _skip_reason(name) or not {n.op_type for n in model.graph.node} <= OPS:
            continue
        try:
            m, example = _prepare(model, ins)
        except pytest.skip.Exception:
            continue
        gm = lift_graph(m, example)
        want = gm(*example.values())
        got = torch.jit.script(gm)(*example.values())
        for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,),
                        strict=True):
            assert torch.allclose(g, w, equal_nan=True) if g.is_floating_point() else torch.equal(g, w), name


def test_range_cases_with_bounds_at_run_time() -> None:
    """ONNX's Range cases with the bounds left as graph inputs (computed tensors, as exporters feed it)."""
    checked = 0
    for name, model, ins, outs in _cases("rangeop"):
        if name.endswith("_expanded") or _skip_reason(name):
            continue
        example = {vi.name: torch.from_numpy(_array(v).copy()) for vi, v in zip(model.graph.input, ins, strict=True)}
        got = lift_graph(model, example)(*example.values())
        want = torch.from_numpy(_array(outs[0]).copy())
        assert got.dtype == want.dtype and torch.equal(got, want), name
        checked += 1
    assert checked >= 2  # float and int32 bounds, at least
