"""``slim run`` as a user runs it: real digits data end to end, and every bad input a one-line error."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from slimcore.cli import main as cli_main
from tests.conftest import run_slim, write_spec
from tests.zoo import save_model

DIGITS_SPEC = {
    "input_shape": [1, 1, 8, 8],
    "method": {"name": "l1", "strength": 3e-3},
    "sparse_training": {"epochs": 8, "batch_size": 64, "lr": 0.02},
    "prune": {"target": "params", "amount": 0.62},
    "finetune": {"epochs": 8, "batch_size": 64, "lr": 0.01},
}


def _accuracy(model, npz: Path) -> float:
    d = np.load(npz)
    with torch.no_grad():
        out = model(torch.from_numpy(d["x_val"]))
    return float((out.argmax(1) == torch.from_numpy(d["y_val"])).float().mean())


@pytest.mark.parametrize("fmt", ["pt2"])  # TorchScript takes the same path end to end in test_service_e2e
def test_digits_slimmed_keeps_accuracy(tmp_path, digits, digits_cnn, fmt):
    """The real-data promise: ≥ 60% of parameters removed, accuracy within 1 point after fine-tuning."""
    model_path = save_model(digits_cnn, fmt, tmp_path / f"model.{fmt}", torch.zeros(1, 1, 8, 8))
    spec = write_spec(tmp_path / "spec.json", **DIGITS_SPEC)
    out, rep = tmp_path / f"slim.{fmt}", tmp_path / "report.json"
    r = run_slim("run", str(model_path), "--spec", str(spec), "--data", str(digits), "-o", str(out),
                 "--report", str(rep), "--plots", str(tmp_path / "plots"))
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(rep.read_text())
    assert sorted(p.name for p in (tmp_path / "plots").glob("*.png")) == ["channels.png", "gamma.png", "stages.png"]
    base, fin = report["stages"]["baseline"], report["stages"]["finetuned"]
    assert fin["params"] <= 0.4 * base["params"]
    assert fin["flops"] < base["flops"]
    assert fin["accuracy"] >= base["accuracy"] - 0.01
    # the written file is what the report says: reload it and measure it independently
    reloaded = torch.jit.load(str(out)) if fmt == "script" else torch.export.load(str(out)).module()
    assert sum(p.numel() for p in digits_cnn.parameters()) == base["params"]
    assert abs(_accuracy(reloaded, digits) - fin["accuracy"]) < 1e-6
    assert _accuracy(digits_cnn, digits) == pytest.approx(base["accuracy"], abs=1e-6)
    assert report["model_bytes"]["after"] < report["model_bytes"]["before"]
    assert any(lay["channels_after"] < lay["channels_before"] for lay in report["layers"])
    assert report["version"] == 1 and report["method"]["name"] == "l1"
    for stage in ("baseline", "sparse", "pruned", "finetuned"):
        assert report["stages"][stage]["latency_ms"] > 0
    took = report["stage_seconds"]  # every stage before the report's own, each within the job's wall time
    assert {"import", "sparse_training", "prune", "finetuning", "export"} <= set(took)
    # each figure is rounded to the millisecond: the sum of eleven may pass the rounded total by half of one each
    assert all(t >= 0 for t in took.values()) and sum(took.values()) <= report["wall_seconds"] + 0.0005 * len(took)
    assert took["sparse_training"] > 0


def _bad(tmp_path: Path, model: Path, spec: dict | str, data: Path) -> str:
    """Run the ``slim run`` entry point in-process (the same code the command execs into, without paying a
    torch import per case); the exec path itself is covered by the digits test above."""
    sp = tmp_path / "bad_spec.json"
    sp.write_text(spec if isinstance(spec, str) else json.dumps(spec))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli_main(["run", str(model), "--spec", str(sp), "--data", str(data), "-o", str(tmp_path / "out.bin")])
    assert code == 2
    text = err.getvalue()
    # progress lines ("[hh:mm:ss] phase …") may precede it; the failure itself is exactly one line
    lines = [ln for ln in text.strip().splitlines() if ln.strip() and not ln.startswith("[")]
    assert len(lines) == 1 and lines[0].startswith("slim: error: "), text
    assert "Traceback" not in text
    assert not (tmp_path / "out.bin").exists()
    return lines[0]


def test_slim_command_bad_input_exits_nonzero(tmp_path, digits):
    """One real ``slim`` process: the exec into slimcore keeps the one-line error and the exit status."""
    bad = tmp_path / "m.pt"
    bad.write_bytes(b"\xff\xfe" * 100)
    sp = write_spec(tmp_path / "s.json", **DIGITS_SPEC)
    r = run_slim("run", str(bad), "--spec", str(sp), "--data", str(digits), "-o", str(tmp_path / "o"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("slim: error: unrecognised model file")


@pytest.fixture(scope="module")
def small_pt2(tmp_path_factory, digits_cnn) -> Path:
    return save_model(digits_cnn, "pt2", tmp_path_factory.mktemp("m") / "m.pt2", torch.zeros(1, 1, 8, 8))


def test_corrupt_model(tmp_path, digits):
    bad = tmp_path / "m.pt"
    bad.write_bytes(b"PK\x03\x04 this is not really a zip")
    assert "damaged zip" in _bad(tmp_path, bad, DIGITS_SPEC, digits)
    garbage = tmp_path / "g.pt"
    garbage.write_bytes(b"\xff\xfe" * 100)
    assert "unrecognised model file" in _bad(tmp_path, garbage, DIGITS_SPEC, digits)


def test_truncated_onnx_under_a_torchscript_name(tmp_path, digits, digits_cnn):
    """Files are recognised by content, not name: an ONNX file called model.pt is read as ONNX, and a
    truncated one is a one-line error."""
    f = tmp_path / "model.pt"
    torch.onnx.export(digits_cnn, (torch.zeros(1, 1, 8, 8),), str(f), dynamo=False)
    f.write_bytes(f.read_bytes()[:5000])
    msg = _bad(tmp_path, f, DIGITS_SPEC, digits)
    assert "onnx" in msg.lower()


def test_state_dict_is_refused_with_advice(tmp_path, digits, digits_cnn):
    f = tmp_path / "weights.pt"
    torch.save(digits_cnn.state_dict(), f)
    assert "torch.save checkpoint" in _bad(tmp_path, f, DIGITS_SPEC, digits)


def test_model_without_batchnorm(tmp_path, digits):
    m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10)).eval()
    f = save_model(m, "pt2", tmp_path / "nobn.pt2", torch.zeros(1, 1, 8, 8))
    assert "no BatchNorm" in _bad(tmp_path, f, DIGITS_SPEC, digits)


@pytest.mark.parametrize("spec, needle", [
    ({**DIGITS_SPEC, "colour": "blue"}, "colour: unknown field"),
    ({**DIGITS_SPEC, "prune": {"target": "channels", "amount": 1.5}}, "prune.amount"),
    ({**DIGITS_SPEC, "sparse_training": {"epochs": -1}}, "sparse_training.epochs"),
    ({**DIGITS_SPEC, "method": {"name": "magic"}}, "method.name"),
    ({**DIGITS_SPEC, "prune": {"target": "channels", "amount": 0.5, "extra": 1}}, "prune.extra: unknown field"),
    ("{not json", "invalid spec"),
])
def test_bad_spec(tmp_path, digits, small_pt2, spec, needle):
    assert needle in _bad(tmp_path, small_pt2, spec, digits)


def test_data_that_does_not_fit(tmp_path, small_pt2):
    npz = tmp_path / "wrong.npz"
    np.savez(npz, x=np.zeros((20, 3, 32, 32), "float32"), y=np.zeros(20, "int64"))
    msg = _bad(tmp_path, small_pt2, DIGITS_SPEC, npz)
    assert "shape" in msg


def test_labels_beyond_model_classes(tmp_path, small_pt2):
    npz = tmp_path / "labels.npz"
    np.savez(npz, x=np.zeros((20, 1, 8, 8), "float32"), y=np.arange(20, dtype="int64"))
    assert "classes" in _bad(tmp_path, small_pt2, DIGITS_SPEC, npz)


def test_missing_files(tmp_path, digits, small_pt2):
    assert "not found" in _bad(tmp_path, tmp_path / "nope.pt2", DIGITS_SPEC, digits)
    assert "not found" in _bad(tmp_path, small_pt2, DIGITS_SPEC, tmp_path / "nope.npz")


def test_digits_onnx_folded_through_slim_run(tmp_path, digits, digits_cnn):
    """Issue 4's promise: an eval-mode ONNX export (BatchNorm folded into Conv, so no γ) slims through
    ``slim run``: BN re-inserted, ≥ 60% of parameters removed, accuracy within a point, a drop-in ONNX out."""
    import onnx
    import onnxruntime as ort

    f = tmp_path / "digits.onnx"
    torch.onnx.export(digits_cnn, (torch.zeros(2, 1, 8, 8),), str(f), dynamo=False, input_names=["pixels"],
                      output_names=["scores"], dynamic_axes={"pixels": {0: "batch"}, "scores": {0: "batch"}},
                      opset_version=17)
    src = onnx.load(str(f))
    assert not any(n.op_type == "BatchNormalization" and n.output[0].startswith("/features") for n in src.graph.node)
    spec = write_spec(tmp_path / "spec.json", **{k: v for k, v in DIGITS_SPEC.items() if k != "input_shape"})
    out, rep = tmp_path / "slim.onnx", tmp_path / "report.json"
    r = run_slim("run", str(f), "--spec", str(spec), "--data", str(digits), "-o", str(out), "--report", str(rep))
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(rep.read_text())
    assert len(report["reinserted_bn"]) >= 3  # the three folded convs got a γ back
    base, fin = report["stages"]["baseline"], report["stages"]["finetuned"]
    assert fin["params"] <= 0.4 * base["params"]
    assert fin["accuracy"] >= base["accuracy"] - 0.01
    slim = onnx.load(str(out))
    onnx.checker.check_model(slim, full_check=True)
    assert [i.name for i in slim.graph.input] == ["pixels"] and [o.name for o in slim.graph.output] == ["scores"]
    assert slim.opset_import[0].version == 17
    assert slim.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    d = np.load(digits)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    pred = sess.run(None, {"pixels": d["x_val"]})[0].argmax(1)
    assert abs(float((pred == d["y_val"]).mean()) - fin["accuracy"]) < 1e-6
    odd = [lay["name"] for lay in report["layers"] if lay["channels_after"] % 8
           and lay["channels_after"] != lay["channels_before"]]
    assert odd, "this plan keeps odd counts (round_to 1), so the warning below is exercised"
    assert any("not multiples of 8" in w and 'round_to: "auto"' in w for w in report["warnings"])
