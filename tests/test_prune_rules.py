"""Unit tests of the pruning rules and the L1 update, on tiny models where the answer is known."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch import nn

from slimcore.errors import NothingToPrune
from slimcore.groups import build_groups
from slimcore.methods import METHODS, MethodContext
from slimcore.prune import apply, plan
from slimcore.spec import MethodSpec, PruneSpec
from tests.zoo import TwoConvNet as Net


def _model(pad: int = 0) -> fx.GraphModule:
    torch.manual_seed(0)
    m = Net(pad)
    with torch.no_grad():
        for bn in (m.b1, m.b2):
            bn.weight.copy_(torch.linspace(0.1, 1.6, 8))
            bn.bias.copy_(torch.linspace(-0.3, 0.4, 8))
            bn.running_var.uniform_(0.5, 1.5)
    return fx.symbolic_trace(m.eval())


X = torch.randn(16, 2, 12, 12)


def test_l1_adds_lambda_sign_to_gamma_grads_only():
    m = _model()
    gs = build_groups(m, X[:2], [])
    bns = [m.b1, m.b2]
    meth = METHODS.get("l1")(MethodSpec(name="l1", strength=0.5), MethodContext(m, gs, bns))
    with torch.no_grad():
        m.b1.weight[0] = -0.2
    m.train()
    m(X).sum().backward()
    before = {n: p.grad.clone() for n, p in m.named_parameters()}
    meth.after_backward()
    for n, p in m.named_parameters():
        if n in ("b1.weight", "b2.weight"):
            assert torch.allclose(p.grad - before[n], 0.5 * torch.sign(p.detach()))
        else:
            assert torch.equal(p.grad, before[n]), n  # β and conv weights untouched
    assert (m.b1.weight.grad - before["b1.weight"])[0] == -0.5


def test_global_threshold_removes_lowest_gamma_across_layers():
    m = _model()
    gs = build_groups(m, X[:2], [])
    p = plan(m, gs, PruneSpec(target="channels", amount=0.25, min_channels=1), "max", X[:2])
    assert p.removed_channels == 4  # 25% of the 16 prunable channels
    # both layers have γ = linspace(0.1, 1.6): the two smallest of each go, one global threshold
    removed = {gs.groups[g].root_name: sorted(v.tolist()) for g, v in p.remove.items()}
    assert removed == {"c1": [0, 1], "c2": [0, 1]}
    assert 0.31 < p.threshold < 0.53


def test_floor_round_to_and_ignore():
    m = _model()
    gs = build_groups(m, X[:2], [])
    p = plan(m, gs, PruneSpec(target="channels", amount=0.9, min_channels=6), "max", X[:2])
    assert all(v.numel() <= 2 for v in p.remove.values())  # 8 channels, floor 6
    assert any("target not reached" in w for w in p.warnings)
    p = plan(m, gs, PruneSpec(target="channels", amount=0.4, min_channels=1, round_to=4), "max", X[:2])
    for g, v in p.remove.items():
        assert (gs.groups[g].size - v.numel()) % 4 == 0
    gs2 = build_groups(m, X[:2], ["c1"])
    assert [g.root_name for g in gs2.groups] == ["c2"]


def test_zero_gamma_channel_is_absorbed_exactly_without_padding():
    m = _model(pad=0)
    with torch.no_grad():
        m.b1.weight[[2, 5]] = 0.0  # channels 2 and 5 of layer 1 now output the constant relu(β)
        ref = m(X)
    gs = build_groups(m, X[:2], [])
    g1 = next(g for g in gs.groups if g.root_name == "c1")
    apply(m, gs, {g1.gid: torch.tensor([2, 5])}, calib=[X])
    assert m.c1.out_channels == 6 and m.c2.in_channels == 6
    assert m.c2.bias is not None  # the constant went into the next layer's bias
    with torch.no_grad():
        assert (m(X) - ref).abs().max() <= 1e-5


def test_threshold_target_and_loud_no_ops():
    m = _model()
    gs = build_groups(m, X[:2], [])
    p = plan(m, gs, PruneSpec(target="threshold", amount=0.35, min_channels=1), "max", X[:2])
    assert p.removed_channels == 4  # γ 0.1 and 0.314 in each layer
    p = plan(m, gs, PruneSpec(target="threshold", amount=0.05, min_channels=1), "max", X[:2])
    assert p.removed_channels == 0  # the pipeline turns this into NothingToPrune
    plain = fx.symbolic_trace(nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)))
    with pytest.raises(NothingToPrune, match="no BatchNorm"):
        build_groups(plain, X[:2], [])


def test_untrained_equal_gammas_fail_loudly(tmp_path, digits):
    """An untrained net (every γ = 1) with no sparse training cannot be ranked: a clear error."""
    from slimcore.pipeline import run_job
    from slimcore.spec import parse_spec
    from tests.zoo import SmallCNN, save_model

    f = save_model(SmallCNN().eval(), "pt2", tmp_path / "m.pt2", torch.zeros(1, 1, 8, 8))
    spec = parse_spec({"sparse_training": {"epochs": 0}, "finetune": {"epochs": 0}})
    with pytest.raises(NothingToPrune, match="all BatchNorm γ are equal"):
        run_job(f, spec, digits, tmp_path / "o.pt2")


def test_too_strong_penalty_is_named_in_the_report(tmp_path, digits, digits_cnn):
    """A penalty that kills every channel during sparse training must not pass quietly."""
    from slimcore.pipeline import run_job
    from slimcore.spec import parse_spec
    from tests.zoo import save_model

    f = save_model(digits_cnn, "pt2", tmp_path / "m.pt2", torch.zeros(1, 1, 8, 8))
    spec = parse_spec({"method": {"name": "l1", "strength": 0.5}, "sparse_training": {"epochs": 2, "lr": 0.02},
                       "prune": {"target": "channels", "amount": 0.5}, "finetune": {"epochs": 1}})
    report = run_job(f, spec, digits, tmp_path / "o.pt2")
    assert any("penalty strength" in w and "too high" in w for w in report["warnings"])
