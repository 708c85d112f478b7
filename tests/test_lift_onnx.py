"""ONNX in: torchvision models exported both ways, BatchNorm folded and kept, lifted and checked.

Each case exports a zoo model (random weights, randomized BN statistics, 10 classes) with a dynamic
batch axis, lifts it, and checks what the later stages rely on: parity with onnxruntime running the
file at two batch sizes (batch 1 and the export batch can hide batch-mixing bugs), the BatchNorm
modules the file still has, a Torch-Pruning dependency graph with groups, and ``torch.jit.script``.

Which exports keep BN: ``dynamo=True`` folds BN into Conv unless ``optimize=False``; the legacy exporter
folds unless ``do_constant_folding=False`` (with ``training=PRESERVE``). A BN that does not follow a
conv cannot be folded (DenseNet's pre-activation BNs, the BatchNorm1d after SmallCNN's Linear in the
legacy export), so "folded" means "as many BN as the file has", usually 0. The dynamo exporter writes
external data by default (tests/test_onnx_external.py covers that), so these pass ``external_data=False``. The
legacy exporter cannot export VGG at 64x64 (adaptive_avg_pool2d from 2x2 to 7x7), so that case is at 224.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch_pruning as tp
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from slimcore.errors import SlimError, UnsupportedModel
from slimcore.lift.onnx_import import import_onnx
from slimcore.lift.parity import relative_error
from tests.zoo import input_shape, make_model

torch.set_num_threads(1)
BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
META = {"onnx_opset", "onnx_ir_version", "onnx_inputs", "onnx_outputs", "onnx_metadata", "onnx_producer",
        "unprunable", "bn_in_file", "onnx_external_data"}
VARIANTS = [("dynamo", False), ("dynamo", True), ("legacy", False), ("legacy", True)]
TORCHVISION = ["resnet18", "vgg11_bn", "mobilenet_v2", "efficientnet_b0", "densenet121"]
LIGHT = ["resnet18", "mobilenet_v2", "efficientnet_b0"]  # legacy exports of these take < 6 s; the rest 10-60 s


def export(model: nn.Module, path: Path, shape: tuple[int, ...], exporter: str, keep_bn: bool) -> Path:
    """Export as a user would, with a dynamic batch axis named "batch"."""
    x = torch.randn((2, *shape[1:]), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            torch.onnx.export(model, (x,), str(path), dynamo=True, optimize=not keep_bn, external_data=False,
                              input_names=["input"], output_names=["logits"], verbose=False,
                              dynamic_shapes=({0: torch.export.Dim("batch")},))
        else:
            kw = {"training": torch.onnx.TrainingMode.PRESERVE, "do_constant_folding": False} if keep_bn else {}
            torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, **kw)
    return path


def _case(name: str, exporter: str, keep_bn: bool, tmp_path: Path) -> None:
    model = make_model(name)
    shape = (1, 3, 224, 224) if name == "vgg11_bn" and exporter == "legacy" else input_shape(name)
    path = export(model, tmp_path / f"{name}.onnx", shape, exporter, keep_bn)
    in_file = sum(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)
    in_model = sum(isinstance(m, BN) for m in model.modules())
    assert in_file == in_model if keep_bn else in_file < in_model

    imp = import_onnx(path, None)
    gm = imp.module
    assert (imp.fmt, imp.input_shape, imp.input_name, imp.dynamic_batch) == ("onnx", shape, "input", True)
    assert set(imp.meta) == META and imp.meta["bn_in_file"] == (in_file > 0)
    assert imp.meta["onnx_inputs"] == [{"name": "input", "elem_type": 1, "dims": ["batch", *shape[1:]]}]
    assert imp.meta["onnx_outputs"][0]["dims"] == ["batch", 10] and imp.meta["unprunable"] == {}
    assert sum(isinstance(m, BN) for m in gm.modules()) == in_file
    assert not gm.training
    errs = []
    for batch in (2, 5):
        x = torch.randn((batch, *shape[1:]), generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            got = gm(x)
            errs.append(relative_error(imp.original(x), got))
            assert relative_error(model(x), got) <= 1e-4
    print(f"\nPARITY {name} {exporter} {'kept' if keep_bn else 'folded'}: {max(errs):.2e}")
    assert max(errs) <= 1e-5, errs

    for bn in (m for m in gm.modules() if isinstance(m, BN)):
        assert (bn.momentum, bn.eps) == (0.1, pytest.approx(1e-5)) and not bn.training

    x = torch.randn((2, *shape[1:]))
    dg = tp.DependencyGraph().build_dependency(gm, example_inputs=x)
    assert list(dg.get_all_groups(root_module_types=[nn.Conv2d, nn.Linear]))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert relative_error(gm(x), torch.jit.script(gm)(x)) <= 1e-6
    # sizes are live: after removing channels everywhere the model still runs, at any batch, and scripts
    assert _prune(gm, x, [m for m in gm.modules() if isinstance(m, nn.Linear)][-1:]) > 0
    for batch in (1, 5):
        with torch.no_grad():
            assert gm(torch.randn((batch, *shape[1:]))).shape == (batch, 10)
    torch.jit.script(gm)
    _slim_and_export(path, shape, tmp_path)


def _slim_and_export(path: Path, shape: tuple[int, ...], tmp_path: Path) -> None:
    """Issue 4's chain on a fresh import: BN re-inserted where folded, half the channels removed by the
    global planner (≥ 40% of parameters), exported as ONNX, reloaded in onnxruntime: same names, same
    symbolic batch axis, same outputs as the pruned module."""
    import onnxruntime as ort

    from slimcore.export import EXPORTERS
    from slimcore.groups import build_groups
    from slimcore.lift.bn_insert import reinsert_bn
    from slimcore.measure import count_params
    from slimcore.pipeline import _load_plugins
    from slimcore.prune import apply, plan
    from slimcore.spec import PruneSpec

    _load_plugins()
    imp = import_onnx(path, None)
    gm = imp.module
    calib = [torch.randn((8, *shape[1:]), generator=torch.Generator().manual_seed(3))]
    reinsert_bn(gm, calib)
    x = calib[0][:2]
    gs = build_groups(gm, x, [], imp.meta.get("unprunable"))
    p0 = count_params(gm)
    # VGG's BN-free classifier holds most parameters; removing 60% of channels (the last conv's feed the
    # 25 088-wide Linear) clears the bar. Not a `params` target: its exact search deep-copies VGG-11's
    # 129M parameters per step (70+ s a case).
    target = PruneSpec(target="channels", amount=0.6 if "vgg" in path.name else 0.5, min_channels=1)
    apply(gm, gs, plan(gm, gs, target, "max", x).remove, calib)
    assert count_params(gm) <= 0.6 * p0
    out = tmp_path / "slim.onnx"
    EXPORTERS.get("onnx")(gm.eval(), imp, out, x)  # checks full_check + ORT parity at batch 2 and 5 itself
    slim = onnx.load(str(out))
    assert [i.name for i in slim.graph.input] == ["input"] and [o.name for o in slim.graph.output] == ["logits"]
    assert slim.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x3 = torch.randn((3, *shape[1:]))
    with torch.no_grad():
        assert relative_error(torch.from_numpy(sess.run(None, {"input": x3.numpy()})[0]), gm(x3)) <= 1e-4


@pytest.mark.parametrize(("exporter", "keep_bn"), VARIANTS)
def test_smallcnn(exporter: str, keep_bn: bool, tmp_path: Path) -> None:
    _case("smallcnn", exporter, keep_bn, tmp_path)


@pytest.mark.parametrize("name", LIGHT)
@pytest.mark.parametrize("keep_bn", [False, True])
def test_torchvision_legacy(name: str, keep_bn: bool, tmp_path: Path) -> None:
    _case(name, "legacy", keep_bn, tmp_path)


@pytest.mark.heavy
@pytest.mark.parametrize("name", TORCHVISION)
@pytest.mark.parametrize(("exporter", "keep_bn"), VARIANTS)
def test_torchvision(name: str, exporter: str, keep_bn: bool, tmp_path: Path) -> None:
    if exporter == "legacy" and name in LIGHT:
        pytest.skip("a light case: test_torchvision_legacy")
    _case(name, exporter, keep_bn, tmp_path)


def _prune(gm: torch.fx.GraphModule, x: torch.Tensor, ignored: list[nn.Module]) -> int:
    """Remove channels 0 and 1 from every group a BN-scale pruner could take (grouped, non-depthwise convs
    are left whole, as groups.py does)."""
    def grouped(m: nn.Module) -> bool:
        return isinstance(m, nn.Conv2d) and 1 < m.groups and not m.groups == m.in_channels == m.out_channels

    dg = tp.DependencyGraph().build_dependency(gm, example_inputs=x)
    done = 0
    for g in list(dg.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d, nn.Linear])):
        root = g[0].dep.target.module
        if len(g[0].idxs) < 4 or any(grouped(it.dep.target.module) for it in g.items):
            continue
        fn = tp.prune_conv_out_channels if isinstance(root, nn.Conv2d) else tp.prune_linear_out_channels
        group = dg.get_pruning_group(root, fn, idxs=[0, 1])
        if dg.check_pruning_group(group):
            group.prune()
            done += 1
    return done


class _ViewHead(nn.Module):
    """``x.view(x.size(0), -1)``: the legacy exporter writes Shape -> Gather -> Unsqueeze -> Concat -> Reshape."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8 * 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.max_pool2d(self.bn(self.conv(x)).relu(), 2)
        return self.fc(y.view(y.size(0), -1))


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_shape_chain_sizes_are_live(exporter: str, tmp_path: Path) -> None:
    """Shape/Gather chains become ``sym_size`` arithmetic, not the example's numbers, so pruning and other
    batch sizes work (the dynamo export even bakes 128 = 8*4*4 into a constant it concatenates)."""
    from tests.zoo import randomize_bn

    path = export(randomize_bn(_ViewHead()).eval(), tmp_path / "v.onnx", (1, 1, 8, 8), exporter, True)
    assert {"Shape", "Concat"} <= {n.op_type for n in onnx.load(str(path)).graph.node}
    imp = import_onnx(path, None)
    gm, x = imp.module, torch.randn(2, 1, 8, 8)
    assert "sym_size" in gm.code and imp.meta["unprunable"] == {}
    tp.DependencyGraph().build_dependency(gm, example_inputs=x).get_pruning_group(
        gm.get_submodule("m.conv"), tp.prune_conv_out_channels, idxs=[0, 3]).prune()
    assert gm.get_submodule("m.fc").in_features == 6 * 16 and gm.get_submodule("m.bn").num_features == 6
    for batch in (1, 5):
        with torch.no_grad():
            assert gm(torch.randn(batch, 1, 8, 8)).shape == (batch, 3)
    torch.jit.script(gm)


def _model(nodes: list[onnx.NodeProto], inits: list[TensorProto], in_shape: list[int | str],
           out_shape: list[int | str], opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _w(name: str, *shape: int) -> TensorProto:
    return numpy_helper.from_array(np.random.default_rng(0).standard_normal(shape).astype(np.float32), name)


def _save(m: onnx.ModelProto, path: Path) -> Path:
    onnx.save(m, str(path))
    return path


@pytest.mark.parametrize("target", [[-1, 128], [0, -1], [0, 128]])
def test_constant_flatten_shape_follows_pruning(target: list[int], tmp_path: Path) -> None:
    """A Reshape to a constant [-1, C*H*W] (or [0, -1], 0 = copy) is a flatten: its sizes are computed at
    run time, so pruning the conv and other batch sizes work."""
    m = _model([helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["c"], pads=[1, 1, 1, 1], name="conv"),
                helper.make_node("Relu", ["c"], ["r"]),
                helper.make_node("Reshape", ["r", "shape"], ["f"]),
                helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["y"], transB=1, name="fc")],
               [_w("conv.weight", 8, 3, 3, 3), _w("conv.bias", 8), _w("fc.weight", 4, 128), _w("fc.bias", 4),
                numpy_helper.from_array(np.array(target), "shape")], ["N", 3, 4, 4], ["N", 4])
    imp = import_onnx(_save(m, tmp_path / "f.onnx"), None)
    gm = imp.module
    assert isinstance(gm.get_submodule("m.conv"), nn.Conv2d) and isinstance(gm.get_submodule("m.fc"), nn.Linear)
    assert imp.meta["bn_in_file"] is False and imp.meta["unprunable"] == {}
    x = torch.randn(3, 3, 4, 4)
    dg = tp.DependencyGraph().build_dependency(gm, example_inputs=x)
    dg.get_pruning_group(gm.get_submodule("m.conv"), tp.prune_conv_out_channels, idxs=[0, 5]).prune()
    assert gm.get_submodule("m.fc").in_features == 96
    with torch.no_grad():
        assert gm(torch.randn(7, 3, 4, 4)).shape == (7, 4)


def test_channel_shuffle_is_followed(tmp_path: Path) -> None:
    """Reshape (N, 2, C/2, H, W) + Transpose + Reshape back: sizes follow the tensor at run time, and the
    coupling analysis ties each column of the (2, C/2) grid, so a's 8 channels go in 4 pairs."""
    m = _model([helper.make_node("Conv", ["x", "a.weight"], ["a"], name="a"),
                helper.make_node("Reshape", ["a", "s5"], ["r5"]),
                helper.make_node("Transpose", ["r5"], ["t"], perm=[0, 2, 1, 3, 4]),
                helper.make_node("Reshape", ["t", "s4"], ["r4"]),
                helper.make_node("Conv", ["r4", "b.weight"], ["y"], name="b")],
               [_w("a.weight", 8, 3, 1, 1), _w("b.weight", 5, 8, 1, 1),
                numpy_helper.from_array(np.array([0, 2, 4, 6, 6]), "s5"),
                numpy_helper.from_array(np.array([0, 8, 6, 6]), "s4")], ["N", 3, 6, 6], ["N", 5, 6, 6])
    imp = import_onnx(_save(m, tmp_path / "s.onnx"), None)
    assert imp.meta["unprunable"] == {}
    with torch.no_grad():
        x = torch.randn(4, 3, 6, 6)
        assert relative_error(imp.original(x), imp.module(x)) <= 1e-5
    from slimcore.coupling import analyze

    cp = analyze(imp.module, x[:2])
    out_a = next(r for r in cp.records if r.kind == "out" and r.name.endswith("a"))
    labels = cp.label[out_a.atoms]
    assert len(set(labels.tolist())) == 4 and (labels[:4] == labels[4:]).all()


class _Decoder(nn.Module):
    """A transposed conv and a nearest upsample joined by an add, as in a small segmentation head."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(3, 4, 1)
        self.up, self.b = nn.ConvTranspose2d(8, 4, 2, stride=2), nn.Conv2d(4, 6, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(self.bn(self.a(x)).relu()) + nn.functional.interpolate(self.c(x), scale_factor=2.0)
        return self.b(y).mean((2, 3))


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_transposed_conv_is_fenced(exporter: str, tmp_path: Path) -> None:
    """Torch-Pruning would take the functional ConvTranspose for an element-wise op and prune m.a and m.c
    (8 and 4 channels) together; both are reported unprunable instead, m.b stays prunable."""
    from tests.zoo import randomize_bn

    imp = import_onnx(export(randomize_bn(_Decoder()).eval(), tmp_path / "d.onnx", (1, 3, 8, 8), exporter, True), None)
    assert set(imp.meta["unprunable"]) == {"m.a", "m.c"} and "transposed" in imp.meta["unprunable"]["m.a"]
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        assert relative_error(imp.original(x), imp.module(x)) <= 1e-5
    torch.jit.script(imp.module)


def test_channel_slice_is_followed(tmp_path: Path) -> None:
    """A constant channel Slice is not fenced: the coupling analysis rewrites its bounds after a prune."""
    m = _model([helper.make_node("Conv", ["x", "a.weight"], ["a"], name="a"),
                helper.make_node("Slice", ["a", "st", "en", "ax"], ["s"]),
                helper.make_node("Conv", ["s", "b.weight"], ["y"], name="b")],
               [_w("a.weight", 8, 3, 1, 1), _w("b.weight", 2, 4, 1, 1)] + [
                   numpy_helper.from_array(np.array([v]), n) for n, v in (("st", 2), ("en", 6), ("ax", 1))],
               ["N", 3, 4, 4], ["N", 2, 4, 4])
    imp = import_onnx(_save(m, tmp_path / "sl.onnx"), None)
    assert imp.meta["unprunable"] == {}
    from slimcore.coupling import analyze, prune

    gm, x = imp.module, torch.randn(2, 3, 4, 4)
    cp = analyze(gm, x)
    a = next(r for r in cp.records if r.kind == "out" and r.name.endswith("a"))
    prune(gm, cp, [int(cp.label[a.atoms[0]]), int(cp.label[a.atoms[3]])])  # one outside, one inside the slice
    assert gm.get_submodule("m.a").out_channels == 6 and gm.get_submodule("m.b").in_channels == 3
    with torch.no_grad():
        assert gm(x).shape == (2, 2, 4, 4)


def test_model_without_convolutions(tmp_path: Path) -> None:
    """An MLP imports (two Linear modules); whether there is anything to prune is the pruner's business."""
    m = _model([helper.make_node("Flatten", ["x"], ["f"]),
                helper.make_node("MatMul", ["f", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
                helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("Gemm", ["r", "w2"], ["y"])],
               [_w("w1", 16, 8), _w("b1", 8), _w("w2", 8, 3)], ["batch", 1, 4, 4], ["batch", 3])
    imp = import_onnx(_save(m, tmp_path / "mlp.onnx"), None)
    layers = [m for m in imp.module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert [type(m) for m in layers] == [nn.Linear, nn.Linear] and layers[0].bias is not None
    assert imp.input_shape == (1, 1, 4, 4) and imp.dynamic_batch


def test_bad_files_are_one_line_errors(tmp_path: Path) -> None:
    good = _model([helper.make_node("Conv", ["x", "w"], ["y"])], [_w("w", 4, 1, 3, 3)], ["N", 1, 8, 8],
                  ["N", 4, 6, 6])
    data = good.SerializeToString()
    for i, blob in enumerate([data[: len(data) // 2], b"\x08\x07" + b"\xff" * 40, b"\x08"]):
        with pytest.raises(SlimError) as e:
            import_onnx(_save_bytes(blob, tmp_path / f"bad{i}.onnx"), None)
        assert "\n" not in str(e.value)

    ext = tmp_path / "ext.onnx"
    onnx.save(good, str(ext), save_as_external_data=True, all_tensors_to_one_file=True, location="ext.data",
              size_threshold=0)
    assert import_onnx(ext, None).meta["onnx_external_data"] == ["ext.data"]  # read from beside the model
    (tmp_path / "ext.data").unlink()
    with pytest.raises(SlimError, match="external data 'ext.data', which is missing"):
        import_onnx(ext, None)

    erf = _model([helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Erf", ["c"], ["y"], name="erf0")],
                 [_w("w", 4, 1, 3, 3)], ["N", 1, 8, 8], ["N", 4, 6, 6])
    with pytest.raises(UnsupportedModel, match=r"unsupported ONNX op Erf \(domain ai.onnx, opset 17\) at node 'erf0'"):
        import_onnx(_save(erf, tmp_path / "erf.onnx"), None)

    two = _model([helper.make_node("Add", ["x", "z"], ["y"])], [], ["N", 4], ["N", 4])
    two.graph.input.append(helper.make_tensor_value_info("z", TensorProto.INT64, ["N", 4]))
    with pytest.raises(UnsupportedModel, match="graph input 'z' is not a float32 tensor"):
        import_onnx(_save(two, tmp_path / "two.onnx"), None)
    two.graph.input[-1].type.tensor_type.elem_type = TensorProto.FLOAT  # several float inputs are supported
    imp = import_onnx(_save(two, tmp_path / "two.onnx"), None)
    x, z = torch.randn(3, 4), torch.randn(3, 4)
    assert imp.input_names == ("x", "z") and torch.allclose(imp.module(x, z), x + z)

    old = _model([helper.make_node("Relu", ["x"], ["y"])], [], ["N", 4], ["N", 4], opset=9)
    with pytest.raises(UnsupportedModel, match="opset 9"):
        import_onnx(_save(old, tmp_path / "old.onnx"), None)


def _save_bytes(blob: bytes, path: Path) -> Path:
    path.write_bytes(blob)
    return path


def test_input_shape_is_checked(tmp_path: Path) -> None:
    conv = [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])]
    fixed = _save(_model(conv, [_w("w", 4, 1, 3, 3)], [-1, 1, 8, 8], [-1, 4, 8, 8]), tmp_path / "a.onnx")
    assert import_onnx(fixed, (1, 1, 8, 8)).input_shape == (1, 1, 8, 8)
    with pytest.raises(SlimError, match="does not match"):
        import_onnx(fixed, (1, 1, 9, 8))
    free = _save(_model(conv, [_w("w", 4, 1, 3, 3)], ["N", 1, "H", "W"], ["N", 4, "H", "W"]), tmp_path / "b.onnx")
    with pytest.raises(SlimError, match="give input_shape"):
        import_onnx(free, None)
    imp = import_onnx(free, (3, 1, 10, 12))
    assert imp.input_shape == (1, 1, 10, 12) and imp.meta["onnx_inputs"][0]["dims"] == ["N", 1, "H", "W"]
    static = _save(_model(conv, [_w("w", 4, 1, 3, 3)], [2, 1, 8, 8], [2, 4, 8, 8]), tmp_path / "c.onnx")
    assert not import_onnx(static, None).dynamic_batch
    with pytest.raises(SlimError, match="does not match"):
        import_onnx(static, (1, 1, 8, 8))
