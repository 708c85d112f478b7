"""ONNX export: the written file must be a drop-in replacement for the upload, and correct.

The ONNX importer is not used here: each case writes a reference ONNX file of the unpruned model the way a
user would (custom names, opset 17 or 18, a symbolic batch, a metadata prop, BatchNorm folded or kept),
reads from it the facts an importer records in ``Imported.meta``, and lifts the same model through the pt2
importer. The model is pruned by 30% with the real planner, exported, and the file checked against both
the upload's interface and the pruned module.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.fx as fx
from torch import nn
from torch.fx.experimental.optimization import fuse

import slimcore.export.onnx as onnx_export
from slimcore.errors import ParityError
from slimcore.export import EXPORTERS, rel_error
from slimcore.groups import all_bns, build_groups
from slimcore.lift import Imported
from slimcore.lift.bn_insert import reinsert_bn
from slimcore.lift.exported import import_pt2
from slimcore.prune import apply, plan
from slimcore.spec import PruneSpec
from tests.zoo import ARCHS, input_shape, make_model, save_model

torch.set_num_threads(1)
aten = torch.ops.aten


def reference_onnx(model: nn.Module, x: torch.Tensor, path: Path, opset: int, keep_bn: bool,
                   dynamo: bool = False) -> Path:
    """The user's upload: names images/logits, symbolic batch, one metadata prop; BN folded or kept."""
    mode = torch.onnx.TrainingMode.PRESERVE if keep_bn else torch.onnx.TrainingMode.EVAL
    names = {"input_names": ["images"], "output_names": ["logits"], "opset_version": opset}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:  # folds BN; opset 18 and up only
            prog = torch.onnx.export(model.eval(), (x,), dynamo=True, verbose=False, **names,
                                     dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
            m = prog.model_proto
        else:
            buf = io.BytesIO()
            torch.onnx.export(model.eval(), (x,), buf, dynamo=False, training=mode, **names,
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
            m = onnx.load_from_string(buf.getvalue())
    m.metadata_props.add(key="author", value="tests")
    onnx.save(m, str(path))
    return path


def meta_of(path: Path) -> dict:
    """What an ONNX importer records about the upload (the exact ``Imported.meta`` keys)."""
    m = onnx.load(str(path))

    def io_(vi: onnx.ValueInfoProto) -> dict:
        t = vi.type.tensor_type
        return {"name": vi.name, "elem_type": t.elem_type,
                "dims": [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]}

    inits = {i.name for i in m.graph.initializer}
    return {"onnx_opset": next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")),
            "onnx_ir_version": m.ir_version,
            "onnx_inputs": [io_(i) for i in m.graph.input if i.name not in inits],
            "onnx_outputs": [io_(o) for o in m.graph.output],
            "onnx_metadata": {p.key: p.value for p in m.metadata_props},
            "onnx_producer": (m.producer_name, m.producer_version),
            "bn_in_file": any(n.op_type == "BatchNormalization" for n in m.graph.node)}


def lifted(model: nn.Module, shape: tuple[int, ...], tmp_path: Path) -> Imported:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = save_model(model, "pt2", tmp_path / "m.pt2", torch.randn((1, *shape[1:])))
        return import_pt2(path, shape)


def as_onnx_upload(imp: Imported, meta: dict) -> Imported:
    """``imp`` as if the ONNX importer had made it (keeping the lifter's own keys, e.g. "unprunable")."""
    return Imported(module=imp.module, fmt="onnx", original=imp.original, input_shape=imp.input_shape,
                    input_name=meta["onnx_inputs"][0]["name"], dynamic_batch=True, meta={**imp.meta, **meta})


def prune30(imp: Imported, x: torch.Tensor) -> None:
    model = imp.module
    gs = build_groups(model, x, [], imp.meta.get("unprunable"))
    p = plan(model, gs, PruneSpec(target="channels", amount=0.3, min_channels=1), "max", x)
    assert p.removed_channels > 0
    apply(model, gs, p.remove, calib=[x])
    model.eval()


def n_params(m: onnx.ModelProto) -> int:
    return sum(int(np.prod(i.dims)) for i in m.graph.initializer)


def ort_run(path: Path, x: torch.Tensor) -> torch.Tensor:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


CASES = [
    pytest.param("smallcnn", 17, True, id="smallcnn-opset17-bn-kept"),
    pytest.param("smallcnn", 18, False, id="smallcnn-opset18-bn-folded"),
    pytest.param("resnet18", 17, False, id="resnet18-opset17-bn-folded"),
    pytest.param("resnet18", 18, True, id="resnet18-opset18-bn-kept", marks=pytest.mark.heavy),
    pytest.param("mobilenet_v2", 18, False, id="mobilenet_v2-opset18-bn-folded", marks=pytest.mark.heavy),
    pytest.param("mobilenet_v2", 17, True, id="mobilenet_v2-opset17-bn-kept", marks=pytest.mark.heavy),
]


@pytest.mark.parametrize("arch, opset, keep_bn", CASES)
def test_pruned_export_is_a_drop_in(tmp_path, arch, opset, keep_bn):
    shape = input_shape(arch)
    x = torch.randn((4, *shape[1:]), generator=torch.Generator().manual_seed(0))
    original = make_model(arch)
    upload = reference_onnx(original, x[:2], tmp_path / "upload.onnx", opset, keep_bn)
    meta = meta_of(upload)
    # a BN after a Linear (SmallCNN's head) survives the exporter's folding: a file with BN in places
    assert meta["bn_in_file"] == (keep_bn or arch == "smallcnn")
    imp = as_onnx_upload(lifted(original if keep_bn else fuse(original), shape, tmp_path), meta)
    model = imp.module
    reinserted = [] if keep_bn else reinsert_bn(model, [x])  # a folded upload has no γ until BNs go back in
    assert keep_bn or reinserted
    prune30(imp, x)
    out = tmp_path / "slim.onnx"
    EXPORTERS.get("onnx")(model, imp, out, x[:1])

    m, ref = onnx.load(str(out)), onnx.load(str(upload))
    onnx.checker.check_model(m, full_check=True)
    inits = {i.name for i in m.graph.initializer}
    assert [i.name for i in m.graph.input if i.name not in inits] == ["images"]
    assert [o.name for o in m.graph.output] == ["logits"]
    assert meta_of(out)["onnx_opset"] == opset and m.ir_version == ref.ir_version
    for got, want in ((meta_of(out)["onnx_inputs"], meta["onnx_inputs"]),
                      (meta_of(out)["onnx_outputs"], meta["onnx_outputs"])):
        assert got == want  # names, dtypes, dims: "batch" symbolic, the rest fixed
    assert meta["onnx_inputs"][0]["dims"][0] == "batch" and meta["onnx_outputs"][0]["dims"] == ["batch", 10]
    props = {p.key: p.value for p in m.metadata_props}
    assert props["author"] == "tests" and props["slim.source_producer"].startswith("pytorch")
    assert not any(n.metadata_props or n.doc_string for n in m.graph.node)
    n_bn = sum(n.op_type == "BatchNormalization" for n in m.graph.node)
    # re-inserted BNs are folded back; BNs that were in the file stay
    assert n_bn == (len(all_bns(model)) - len(reinserted) if meta["bn_in_file"] else 0)
    assert n_params(m) < n_params(ref)
    for b in (2, 5):
        xb = torch.randn((b, *shape[1:]))
        with torch.no_grad():
            assert rel_error(ort_run(out, xb), model(xb)) <= 1e-4


class _Tiny(nn.Module):
    """Ops the dynamo exporter writes as opset-18 ReduceMean and Split (chunk), on a small input."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.b1(self.c1(x)))
        a, b = y.chunk(2, 1)
        y = torch.relu(self.b2(self.c2(torch.cat([b, a], 1))))
        return self.fc(y.mean((2, 3)))


def _tiny_upload(tmp_path: Path, opset: int) -> tuple[Imported, torch.Tensor]:
    torch.manual_seed(0)
    from tests.zoo import randomize_bn

    model = randomize_bn(_Tiny()).eval()
    shape = (1, 3, 16, 16)
    x = torch.randn((4, *shape[1:]))
    meta = meta_of(reference_onnx(model, x[:2], tmp_path / "tiny.onnx", opset, keep_bn=True))
    return as_onnx_upload(lifted(model, shape, tmp_path), meta), x


@pytest.mark.parametrize("opset", [17, 18])
def test_dynamo_route_and_opset_17_conversion(tmp_path, monkeypatch, opset):
    imp, x = _tiny_upload(tmp_path, opset)
    monkeypatch.setattr(onnx_export, "ROUTES", [r for r in onnx_export.ROUTES if "dynamo" in r[0]])
    out = tmp_path / "slim.onnx"
    EXPORTERS.get("onnx")(imp.module, imp, out, x)
    m = onnx.load(str(out))
    assert meta_of(out)["onnx_opset"] == opset
    ops = {n.op_type: n for n in m.graph.node}
    assert {"ReduceMean", "Split"} <= set(ops)
    if opset == 17:  # axes as an attribute, no opset-18 attribute left behind, Split with explicit sizes
        assert [a.name for a in ops["ReduceMean"].attribute if a.name == "axes"] == ["axes"]
        assert not [a for a in ops["ReduceMean"].attribute if a.name == "noop_with_empty_axes"]
        assert len(ops["Split"].input) == 2
    with torch.no_grad():
        assert rel_error(ort_run(out, x), imp.module(x)) <= 1e-4


def test_sym_size_graph_goes_through_torchscript_route(tmp_path, monkeypatch):
    """Run-time sizes (``aten.sym_size``, as the lifters write them) before a view keep the batch dynamic."""
    root = nn.Module()
    root.m = nn.Module()
    root.m.conv, root.m.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4 * 8 * 8, 10)
    g = fx.Graph()
    x_in = g.placeholder("x")
    r = g.call_function(aten.relu, (g.call_module("m.conv", (x_in,)),))
    v = g.call_function(aten.view, (r, [g.call_function(aten.sym_size, (r, 0)), -1]))
    g.output(g.call_module("m.fc", (v,)))
    gm = fx.GraphModule(root, g).eval()
    monkeypatch.setattr(onnx_export, "ROUTES", [r for r in onnx_export.ROUTES if "torchscript" in r[0]])
    imp = Imported(module=gm, fmt="pt2", original=gm, input_shape=(1, 1, 8, 8), input_name="x")
    out = tmp_path / "s.onnx"
    EXPORTERS.get("onnx")(gm, imp, out, torch.randn(1, 1, 8, 8))  # no ONNX meta: the defaults
    m = onnx.load(str(out))
    assert meta_of(out)["onnx_opset"] == 18
    assert meta_of(out)["onnx_inputs"] == [{"name": "x", "elem_type": 1, "dims": ["batch", 1, 8, 8]}]
    assert meta_of(out)["onnx_outputs"] == [{"name": "output", "elem_type": 1, "dims": ["batch", 10]}]
    assert "Shape" in {n.op_type for n in m.graph.node}


def test_float16_interface_and_swapped_names(tmp_path):
    """An upload whose input is called "output" and output "input", in float16: kept, via edge Casts."""
    imp, x = _tiny_upload(tmp_path, 17)
    meta = dict(imp.meta)
    meta["onnx_inputs"] = [{**meta["onnx_inputs"][0], "name": "output", "elem_type": onnx.TensorProto.FLOAT16}]
    meta["onnx_outputs"] = [{**meta["onnx_outputs"][0], "name": "input", "elem_type": onnx.TensorProto.FLOAT16}]
    imp = as_onnx_upload(imp, meta)
    out = tmp_path / "h.onnx"
    EXPORTERS.get("onnx")(imp.module, imp, out, x)
    got = meta_of(out)
    assert got["onnx_inputs"] == meta["onnx_inputs"] and got["onnx_outputs"] == meta["onnx_outputs"]
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"output": x.numpy().astype(np.float16)})[0]
    assert y.dtype == np.float16
    with torch.no_grad():
        assert rel_error(torch.from_numpy(y.astype(np.float32)), imp.module(x.half().float())) <= 2e-3


def test_wrong_file_raises_parity_error(tmp_path, monkeypatch):
    imp, x = _tiny_upload(tmp_path, 18)
    other = _Tiny().eval()  # different weights: a route that wrote the wrong model must not pass

    def wrong(module, xb, t):
        return onnx_export._export_torchscript(other, xb, t)

    monkeypatch.setattr(onnx_export, "ROUTES", [("wrong", wrong)])
    out = tmp_path / "w.onnx"
    with pytest.raises(ParityError, match="relative error"):
        EXPORTERS.get("onnx")(imp.module, imp, out, x)
    assert not out.exists()


def test_interface_mismatch_raises_parity_error(tmp_path):
    imp, x = _tiny_upload(tmp_path, 18)
    meta = dict(imp.meta)
    meta["onnx_outputs"] = [{**meta["onnx_outputs"][0], "dims": ["batch", 7]}]  # the model gives 10
    with pytest.raises(ParityError, match=r"\(10\) vs \(7\)|does not fit"):
        EXPORTERS.get("onnx")(imp.module, as_onnx_upload(imp, meta), tmp_path / "x.onnx", x)


@pytest.mark.heavy
@pytest.mark.parametrize("arch", ARCHS)
def test_every_zoo_arch_bn_folded(tmp_path, arch):
    """The most common upload (BN folded, opset 17) for every zoo architecture: re-insert, prune, export.

    VGG at 64×64 pools 2×2 to 7×7, which only the dynamo exporter writes, so its upload is opset 18.
    """
    shape = input_shape(arch)
    x = torch.randn((4, *shape[1:]), generator=torch.Generator().manual_seed(0))
    original = make_model(arch)
    opset = 18 if arch == "vgg11_bn" else 17
    meta = meta_of(reference_onnx(original, x[:2], tmp_path / "upload.onnx", opset, False, arch == "vgg11_bn"))
    imp = as_onnx_upload(lifted(fuse(original), shape, tmp_path), meta)
    assert reinsert_bn(imp.module, [x])
    prune30(imp, x)
    out = tmp_path / "slim.onnx"
    EXPORTERS.get("onnx")(imp.module, imp, out, x[:1])  # checks names, opset, checker, ORT at batch 2 and 5
    assert meta_of(out)["onnx_opset"] == opset and meta_of(out)["onnx_inputs"] == meta["onnx_inputs"]
    with torch.no_grad():
        assert rel_error(ort_run(out, x), imp.module(x)) <= 1e-4
