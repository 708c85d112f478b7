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


def test_strength_pilot_picks_and_the_run_continues_from_it(tmp_path, digits, digits_cnn):
    """No strength in the spec: the pilot's runs, their sparsity and accuracy, the chosen strength and the
    warm start are all in the report, and the real run is the chosen pilot's continuation."""
    model = save_model(digits_cnn, "pt2", tmp_path / "m.pt2", torch.zeros(1, 1, 8, 8))
    spec = parse_spec({"method": {"name": "polarization", "pilot_runs": 3},
                       "sparse_training": {"epochs": 6, "lr": 0.02}, "prune": {"target": "channels", "amount": 0.5},
                       "finetune": {"epochs": 1, "lr": 0.01}})
    report = run_job(model, spec, digits, tmp_path / "out.pt2")
    p = report["pilot"]
    assert p["used"] and p["wanted_fraction"] == 0.5 and p["pilot_epochs"] == 2
    assert 1 <= len(p["tries"]) <= 3 and p["range"][0] < p["strength"] <= p["range"][1]
    chosen = next(t for t in p["tries"] if t["strength"] == float(f"{p['strength']:.4g}"))
    assert not chosen["damaged"]
    assert report["method"]["strength"] == p["strength"]
    st = report["stages"]
    if report["sparse_training_stopped_early_at"] == p["pilot_epochs"]:  # the pilot's end was the target
        assert st["sparse"]["accuracy"] == pytest.approx(chosen["accuracy"], abs=1e-4)
        assert p["sparsity_reached"] == pytest.approx(chosen["sparsity"], abs=1e-4)
    assert p["sparsity_reached"] >= p["stop_at"] or any("strength pilot aimed" in w for w in report["warnings"])
    # the pilot does not always keep the function through the removal (bench/README.md: its polarization
    # range stops below the 0.05–0.1 that does on this model); when it does not, the report says so
    cost = report["removal_cost"]
    assert cost["before_removal"] == st["sparse"]["accuracy"] and cost["after_removal"] == st["pruned"]["accuracy"]
    assert cost["cost"] <= cost["bound"] or any("removing the channels itself cost" in w for w in report["warnings"])


def test_pilot_says_why_it_did_not_run(digits, digits_cnn):
    from slimcore.groups import build_groups
    from slimcore.strength import choose_strength

    x = torch.zeros(2, 1, 8, 8)
    gm = torch.fx.symbolic_trace(digits_cnn)
    for body, why in [({"method": {"name": "l1", "strength": 1e-3}}, "gives method.strength"),
                      ({"method": {"search": "pilot"}, "prune": {"target": "threshold", "amount": 0.01}},
                       "sets its own cut"),
                      ({"method": {"name": "ista", "pilot_runs": 0}}, "pilot_runs is 0"),
                      ({"method": {"name": "ista", "search": "none"}}, "search is 'none'"),
                      ({"method": {"name": "ista", "search": "control"}}, "steered within the one run"),
                      ({"method": {"search": "pilot"}, "sparse_training": {"epochs": 0}}, "no sparse training")]:
        spec = parse_spec({"input_shape": [1, 1, 8, 8], **body})
        warm, rec = choose_strength(gm, spec, None, x, build_groups(gm, x, []), None,
                                    device=torch.device("cpu"), teacher=None, should_stop=None,
                                    say=lambda *a: None)
        assert warm is None and not rec["used"] and why in rec["why"] and rec["strength"] is None


def test_a_run_that_ends_wrecked_after_the_pilot_goes_back_to_the_pilots_state():
    from types import SimpleNamespace

    from slimcore.strength import back_to_pilot_if_wrecked
    from tests.zoo import SmallCNN

    torch.manual_seed(0)
    model, safe = SmallCNN(), SmallCNN()
    data = SimpleNamespace(x_val=torch.randn(64, 1, 8, 8), y_val=torch.randint(0, 10, (64,)))
    warm = {"model": safe.state_dict(), "epoch": 2}
    cpu = torch.device("cpu")
    # within the allowance (or without a pilot) nothing changes
    assert back_to_pilot_if_wrecked(model, data, warm, {"baseline_accuracy": 0.0}, cpu) is None
    assert back_to_pilot_if_wrecked(model, data, None, {"baseline_accuracy": 0.99}, cpu) is None
    assert not torch.equal(model.state_dict()["features.0.weight"], safe.state_dict()["features.0.weight"])
    # an untrained net scores ~0.1, far below a baseline of 0.99: back to the pilot's weights
    why = back_to_pilot_if_wrecked(model, data, warm, {"baseline_accuracy": 0.99}, cpu)
    assert why is not None and "back to the chosen pilot's state after epoch 2" in why
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), safe.state_dict().values(), strict=True))
