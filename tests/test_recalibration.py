"""The removal that keeps the function (issue 11): BatchNorm statistics re-measured after pruning, and the
within-layer ranking a steered run is cut on."""

from __future__ import annotations

import json

import pytest
import torch
import torch.fx as fx

from slimcore.groups import build_groups
from slimcore.prune import plan
from slimcore.recalibrate import recalibrate_bn, recalibrate_if_closer
from slimcore.spec import PruneSpec
from tests.conftest import run_slim
from tests.zoo import TwoConvNet, save_model

X = torch.randn(64, 2, 12, 12, generator=torch.Generator().manual_seed(0))  # not the global RNG: import order


def _net() -> TwoConvNet:
    torch.manual_seed(0)
    return TwoConvNet().eval()


def test_recalibration_measures_the_network_as_it_is():
    m = _net()
    with torch.no_grad():
        m.b1.running_mean.fill_(5.0)  # statistics that no longer describe what reaches the layer
        m.b1.running_var.fill_(9.0)
    assert recalibrate_bn(m, [X[:32], X[32:]]) == 2
    assert not m.training and not m.b1.training
    with torch.no_grad():
        h = m.c1(X)
    assert torch.allclose(m.b1.running_mean, h.mean((0, 2, 3)), atol=1e-4)
    # the batches' variances averaged: the spread between the two batch means is left out (~1e-3 relative)
    assert torch.allclose(m.b1.running_var, h.var((0, 2, 3), unbiased=True), rtol=3e-3)
    assert m.b1.momentum == 0.1  # put back: later training averages as before
    assert recalibrate_bn(m, [X[:1]]) == 0  # a batch of one has no variance: nothing changed


def test_recalibration_is_kept_only_when_it_brings_the_outputs_closer():
    m = _net()
    with torch.no_grad():  # an untrained network computes its function with the default statistics
        want = m(X[:16])
    saved = m.b1.running_var.clone()
    rec = recalibrate_if_closer(m, [X[:32]], X[:16], want)
    assert rec["layers"] == 2 and rec["kept"] is False
    assert rec["relative_error"]["with"] > rec["relative_error"]["without"] == 0.0
    assert torch.equal(m.b1.running_var, saved)  # put back exactly
    # the same network after its first layer's channels changed scale: re-measuring restores the function
    with torch.no_grad():
        m.b1.running_mean.copy_(m.c1(X).mean((0, 2, 3)))
        m.b1.running_var.copy_(m.c1(X).var((0, 2, 3)))
        m.b2.running_mean.copy_(m.c2(torch.relu(m.b1(m.c1(X)))).mean((0, 2, 3)))
        m.b2.running_var.copy_(m.c2(torch.relu(m.b1(m.c1(X)))).var((0, 2, 3)))
        want = m(X[:16])
        m.c1.weight.mul_(3.0)
    rec = recalibrate_if_closer(m, [X[:32], X[32:]], X[:16], want)
    assert rec["kept"] is True and rec["relative_error"]["with"] < 0.01 < rec["relative_error"]["without"]


def test_within_layer_ranking_takes_from_every_layer():
    """One layer's γ uniformly small (a penalty steered within layers leaves that: BatchNorm before a conv is
    scale-invariant): the global |γ| cut empties it, the within-layer cut takes the same share from each."""
    m = _net()
    with torch.no_grad():
        m.b1.weight.copy_(torch.linspace(0.01, 0.08, 8))
        m.b2.weight.copy_(torch.linspace(0.1, 1.6, 8))
    g = fx.symbolic_trace(m)
    gs = build_groups(g, X[:2], [])
    spec = PruneSpec(target="channels", amount=0.5, min_channels=1)
    glob = {gs.groups[k].root_name: v.numel() for k, v in plan(g, gs, spec, "max", X[:2]).remove.items()}
    within = plan(g, gs, spec, "max", X[:2], within_layer=True)
    assert glob == {"c1": 7, "c2": 1}
    assert {gs.groups[k].root_name: v.numel() for k, v in within.remove.items()} == {"c1": 4, "c2": 4}


def test_a_traced_model_reports_its_recalibration(tmp_path, digits, digits_cnn):
    """Through ``slim run`` on a traced TorchScript upload: the report says the statistics were re-measured
    and by how much that brought the outputs back; ``prune.recalibrate_bn: false`` turns it off."""
    path = save_model(digits_cnn, "trace", tmp_path / "m.pt", torch.zeros(1, 1, 8, 8))
    reports = {}
    for on in (True, False):
        spec = {"input_shape": [1, 1, 8, 8], "method": {"name": "l1", "strength": 3e-3},
                "sparse_training": {"epochs": 1},
                "prune": {"target": "channels", "amount": 0.5, "recalibrate_bn": on}, "finetune": {"epochs": 0}}
        (tmp_path / "spec.json").write_text(json.dumps(spec))
        r = run_slim("run", str(path), "--spec", str(tmp_path / "spec.json"), "--data", str(digits),
                     "-o", str(tmp_path / f"out{on}.pt"), "--report", str(tmp_path / f"r{on}.json"))
        assert r.returncode == 0, r.stderr[-2000:]
        reports[on] = json.loads((tmp_path / f"r{on}.json").read_text())
    rec = reports[True]["bn_recalibration"]
    assert rec["layers"] == 4 and rec["kept"] is True  # the digits CNN's four BatchNorms
    assert rec["relative_error"]["with"] < rec["relative_error"]["without"]
    assert reports[False]["bn_recalibration"] == {"layers": 0, "kept": False, "why": "prune.recalibrate_bn is false"}
    assert reports[True]["target"]["ranking"] == "global"  # a given strength: the paper's global |γ| cut
    acc = {on: reports[on]["stages"]["pruned"]["accuracy"] for on in (True, False)}
    assert acc[True] >= acc[False] - 0.01, acc


@pytest.mark.parametrize("method", ["l1", "polarization", "receding"])
def test_a_steered_run_is_cut_within_layers_unless_importances_share_one_scale(tmp_path, digits, digits_cnn, method):
    """Steered penalties spare each layer's kept share, so the cut is within each layer (polarization too,
    since session 14); receding's bounded importances sigmoid(w) share one (0, 1) scale and are cut on it."""
    path = save_model(digits_cnn, "pt2", tmp_path / "m.pt2", torch.zeros(1, 1, 8, 8))
    spec = {"method": {"name": method, "search": "control"}, "sparse_training": {"epochs": 2},
            "prune": {"target": "channels", "amount": 0.5}, "finetune": {"epochs": 0}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    r = run_slim("run", str(path), "--spec", str(tmp_path / "spec.json"), "--data", str(digits),
                 "-o", str(tmp_path / "out.pt2"), "--report", str(tmp_path / "r.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["strength_control"]["used"]
    assert report["target"]["ranking"] == ("global" if method == "receding" else "within_layer")
