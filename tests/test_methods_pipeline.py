"""Every sparsity method through the whole pipeline on real digits data: it trains, prunes the asked share,
fine-tunes and exports a smaller working model, and the report says which method ran."""

from __future__ import annotations

import pytest
import torch

from slimcore.pipeline import run_job
from slimcore.spec import parse_spec
from tests.zoo import save_model

METHODS = [("l1", {"strength": 3e-3, "group": True}), ("group_lasso", {"strength": 3e-3}),
           ("ista", {"strength": 2e-3}), ("receding", {"strength": 1e-3}), ("polarization", {"strength": 1e-3})]


@pytest.mark.parametrize("name, params", METHODS, ids=[m[0] for m in METHODS])
def test_method_end_to_end(tmp_path, digits, digits_cnn, name, params):
    model = save_model(digits_cnn, "pt2", tmp_path / "m.pt2", torch.zeros(1, 1, 8, 8))
    spec = parse_spec({"method": {"name": name, **params}, "sparse_training": {"epochs": 3, "lr": 0.02},
                       "prune": {"target": "channels", "amount": 0.4}, "finetune": {"epochs": 2, "lr": 0.01}})
    report = run_job(model, spec, digits, tmp_path / "out.pt2")
    st = report["stages"]
    assert report["method"]["name"] == name
    assert st["finetuned"]["params"] < st["baseline"]["params"]
    assert report["target"]["achieved"] == pytest.approx(0.4, abs=0.02)
    assert st["finetuned"]["accuracy"] > 0.9
    out = torch.export.load(str(tmp_path / "out.pt2")).module()
    assert out(torch.zeros(4, 1, 8, 8)).shape == (4, 10)
