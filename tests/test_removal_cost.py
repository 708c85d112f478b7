"""The report says what removing channels cost by itself, and names the layers to blame (issue 11, item 3)."""

from __future__ import annotations

import json

import torch

from tests.conftest import run_slim, write_spec


def test_costly_removal_is_reported_with_its_culprits(tmp_path, digits, digits_cnn):
    from tests.zoo import save_model

    model = save_model(digits_cnn, "trace", tmp_path / "m.pt", torch.randn(1, 1, 8, 8))
    # no sparse training and 70% of channels: removal takes channels that matter
    spec = write_spec(tmp_path / "spec.json", input_shape=[1, 1, 8, 8], sparse_training={"epochs": 0},
                      prune={"amount": 0.7}, finetune={"epochs": 1})
    rep = tmp_path / "r.json"
    r = run_slim("run", str(model), "--spec", str(spec), "--data", str(digits), "-o", str(tmp_path / "o.pt"),
                 "--report", str(rep))
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(rep.read_text())
    cost = report["removal_cost"]
    assert cost["measure"] == "accuracy" and cost["cost"] > cost["bound"]
    assert cost["cost"] == cost["before_removal"] - cost["after_removal"]
    culprits = cost["culprits"]
    layers = {n for n, _ in torch.jit.load(str(model)).named_modules()}  # conv names, as prune.ignore takes
    assert culprits and all(c["layer"] in layers and 0 < c["removed"] < c["of"] for c in culprits)
    rel = [c["relative"] for c in culprits]
    assert rel == sorted(rel, reverse=True) and all(0 < v <= 1 for v in rel)
    warning = next(w for w in report["warnings"] if "removing the channels itself cost" in w)
    assert culprits[0]["layer"] in warning
