"""Update rules of the sparsity methods against hand-computed steps on tiny models, plus the pure logic
(first valley, strength pilot, plateau). L1 is covered in test_prune_rules.py."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.fx as fx
from torch import nn

from slimcore.groups import build_groups
from slimcore.methods import (
    METHODS,
    Method,
    MethodContext,
    SparsityPlateau,
    first_valley_threshold,
    pilot_strength,
)
from slimcore.methods.polarization import penalty
from slimcore.methods.receding import BoundedBatchNorm2d, regularizer
from slimcore.prune import apply, plan
from slimcore.spec import MethodSpec, PruneSpec
from tests.zoo import TwoConvNet as Net

torch.set_num_threads(1)


class Res(nn.Module):
    """A residual block: b0 and b2 see the same channels (one coupled group), b1 its own."""

    def __init__(self) -> None:
        super().__init__()
        self.c0, self.b0 = nn.Conv2d(2, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c1, self.b1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b0(self.c0(x)))
        y = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
        return self.fc(torch.relu(x + y).mean((2, 3)))


torch.manual_seed(0)
X = torch.randn(16, 2, 10, 10)
Y = torch.randint(0, 3, (16,))


def _model(cls: type[nn.Module] = Net, **kw: int) -> fx.GraphModule:
    torch.manual_seed(0)
    m = cls(**kw)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.copy_(torch.linspace(0.1, 1.6, 8))
                mod.bias.copy_(torch.linspace(-0.3, 0.4, 8))
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 1.5)
    return fx.symbolic_trace(m.eval())


def _make(name: str, m: fx.GraphModule, example: torch.Tensor | None = None, **spec: float) -> Method:
    gs = build_groups(m, X[:2], [])
    bns = [b for b in m.modules() if isinstance(b, nn.BatchNorm2d)]
    return METHODS.get(name)(MethodSpec(name=name, **spec), MethodContext(m, gs, bns, example))


def _eval(m: nn.Module) -> torch.Tensor:
    m.eval()
    with torch.no_grad():
        return m(X)


# --- ISTA -------------------------------------------------------------------------------------------

def test_ista_lambda_is_memory_per_channel_over_input_pixels():
    m = _model()
    meth = _make("ista", m, example=X[:2])
    # b1: c1 row 2·3·3 + c2 column 8·3·3 + 8×8 map; b2: c2 row 8·3·3 + head column 3·1·1 + 6×6 map; ÷ 10·10
    lam = {id(bn): t for bn, t in zip(meth.bns, meth.lambdas, strict=True)}
    assert torch.allclose(lam[id(m.b1)], torch.full((8,), (18 + 72 + 64) / 100))
    assert torch.allclose(lam[id(m.b2)], torch.full((8,), (72 + 3 + 36) / 100))
    lazy = _make("ista", _model())  # no example: measured on the first forward
    assert lazy.lambdas is None
    lazy.ctx.model(X[:2])
    lazy.after_step(0.0)
    assert torch.equal(torch.cat(lazy.lambdas), torch.cat(meth.lambdas))


def test_ista_shrink_hand_computed_exact_zeros_no_momentum_no_decay():
    m = _model()
    lr = 0.1
    rho = 0.05 / (lr * 1.54)  # τ = lr·ρ·λ_b1 = 0.05 on b1
    meth = _make("ista", m, example=X[:2], strength=rho)
    opt = torch.optim.SGD(meth.param_groups(m), lr=lr, momentum=0.9, weight_decay=0.1)
    assert sorted(id(p) for g in opt.param_groups for p in g["params"]) == sorted(id(p) for p in m.parameters())
    with torch.no_grad():
        m.b1.weight.copy_(torch.tensor([0.5, -0.2, 0.03, -0.01, 0.30, 0.07, -0.5, 1.0]))
    grad = torch.tensor([0.1, -0.1, 0.0, 0.2, -0.5, 0.3, 0.0, 0.0])
    # step 1: plain SGD γ − lr·g = [.49, -.19, .03, -.03, .35, .04, -.5, 1.0]; then shrink by 0.05
    want1 = torch.tensor([0.44, -0.14, 0.0, 0.0, 0.30, 0.0, -0.45, 0.95])
    for step, want in ((1, want1), (2, torch.tensor([0.38, -0.08, 0.0, 0.0, 0.30, 0.0, -0.40, 0.90]))):
        opt.zero_grad()
        m(X).sum().backward()
        m.b1.weight.grad = grad.clone()  # the hand-chosen gradient, same both steps
        conv_before = m.c1.weight.detach().clone()
        opt.step()
        meth.after_step(lr)
        # step 2 with momentum 0.9 would move γ by lr·1.9·g; without, by lr·g again
        assert torch.allclose(m.b1.weight.detach(), want, atol=1e-6), step
        assert not torch.equal(m.c1.weight.detach(), conv_before)
    zeros = m.b1.weight.detach()[[2, 3, 5]]
    assert torch.equal(zeros, torch.zeros(3))  # exactly zero, not merely small
    assert opt.state[m.b1.weight].get("momentum_buffer") is None
    assert opt.state[m.c1.weight]["momentum_buffer"] is not None  # everything else keeps momentum


def test_ista_spares_the_share_each_layer_keeps():
    """A shrink strong enough to zero every γ zeroes only what the controller does not spare: each group's
    strongest ``floor(share × size)`` channels keep their γ, the rest go to exactly zero, in every layer."""
    m = _model()
    meth = _make("ista", m, example=X[:2], strength=10.0)
    for share, kept in ((0.0, 1), (0.48, 3), (0.5, 4)):
        with torch.no_grad():
            for bn in (m.b1, m.b2):
                bn.weight.copy_(torch.tensor([0.5, -0.2, 0.03, -0.01, 0.30, 0.07, -0.5, 1.0]))
        meth.spare_strongest(share)
        meth.after_step(100.0)  # τ = lr·ρ·λ far above every |γ|
        for bn in (m.b1, m.b2):
            left = bn.weight.detach().abs()
            assert int((left > 0).sum()) == kept, (share, bn)
            strongest = torch.tensor([0.5, 0.2, 0.03, 0.01, 0.30, 0.07, 0.5, 1.0]).topk(kept).values
            assert torch.equal(left[left > 0].sort().values, strongest.sort().values)


def test_spare_index_picks_each_groups_strongest_share():
    """The vectorised choice matches the plain one (per group, ``topk`` of ``max(1, floor(share × size))``
    channels, then every BN that ranks them) on a torchvision ResNet-18, whose coupled groups span several
    BNs; a BN outside every group (``bns`` may hold more, as L1's do) keeps its penalty everywhere."""
    import torchvision

    from slimcore.methods._util import SpareIndex

    m = fx.symbolic_trace(torchvision.models.resnet18(num_classes=10).eval())
    gs = build_groups(m, torch.randn(1, 3, 32, 32), [])
    bns = [b for b in m.modules() if isinstance(b, nn.BatchNorm2d)] + [nn.BatchNorm2d(4)]
    index = SpareIndex(gs, bns)
    gen = torch.Generator().manual_seed(0)
    for share in (0.0, 0.3, 0.5, 0.97, 1.0):
        imp = torch.rand(sum(g.size for g in gs.groups), generator=gen)
        want = {id(bn): torch.ones(bn.weight.numel()) for bn in bns}
        off = 0
        for g in gs.groups:
            top = torch.topk(imp[off:off + g.size], max(1, min(g.size, int(share * g.size)))).indices
            off += g.size
            for b in g.bns:
                want[id(b.module)][b.bn_idx[torch.isin(b.root_idx, top)]] = 0.0
        got = index.masks(imp, share)
        assert all(torch.equal(a, want[id(bn)]) for a, bn in zip(got, bns, strict=True)), share
        assert torch.equal(got[-1], torch.ones(4))
        assert 0 < int((torch.cat(got) == 0).sum()) < len(torch.cat(got))


@pytest.mark.parametrize("name", ["l1", "group_lasso", "receding", "polarization"])
def test_steered_penalties_spare_the_share_each_layer_keeps(name):
    """L1, group lasso, receding and polarization under the controller: the penalty's gradient is zero on each group's
    strongest ``floor(share × size)`` channels (by importance: receding's is sigmoid(w)) and unchanged on the
    rest; without a call it reaches every γ."""
    m = _model()
    meth = _make(name, m, strength=0.5)
    meth.prepare(m)  # receding: the bounded BN its push acts on
    m.train()

    def added() -> dict[str, torch.Tensor]:
        for p in m.parameters():
            p.grad = None
        m(X).sum().backward()
        before = {n: m.get_submodule(n).weight.grad.clone() for n in ("b1", "b2")}
        meth.after_backward()
        return {n: m.get_submodule(n).weight.grad - before[n] for n in ("b1", "b2")}

    everywhere = added()
    assert all(bool((d != 0).all()) for d in everywhere.values())
    meth.spare_strongest(0.5)
    spared = added()
    for n in ("b1", "b2"):
        strongest = meth.importance_of(m.get_submodule(n)).topk(4).indices
        assert torch.equal(spared[n][strongest], torch.zeros(4)), n
        rest = torch.ones(8, dtype=torch.bool)
        rest[strongest] = False
        assert torch.allclose(spared[n][rest], everywhere[n][rest]), n


def test_ista_alpha_rescale_keeps_outputs_and_finalize_restores_exactly():
    m = _model(pad=1)
    before, state = _eval(m), copy.deepcopy(m.state_dict())
    meth = _make("ista", m, example=X[:2], alpha=0.25)
    meth.prepare(m)
    assert torch.allclose(m.b1.weight, 0.25 * state["b1.weight"])
    assert torch.allclose(_eval(m), before, atol=1e-5)  # ReLU is homogeneous: exact even with padding
    assert meth.describe()["prepare_output_change"] < 1e-5
    meth.finalize(m)
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k  # α a power of two: bit-exact round trip


def _ista_train_and_prune(pad: int) -> tuple[int, int, float]:
    m = _model(pad=pad)
    with torch.no_grad():
        m.b1.bias.fill_(0.2)
        m.b2.bias.fill_(0.2)  # ReLU(β) > 0: a removed channel is a nonzero constant
    meth = _make("ista", m, example=X[:2], strength=0.3)
    meth.prepare(m)
    opt = torch.optim.SGD(meth.param_groups(m), lr=0.05, momentum=0.9)
    m.train()
    for _ in range(12):
        opt.zero_grad()
        nn.functional.cross_entropy(m(X), Y).backward()
        meth.after_backward()
        opt.step()
        meth.after_step(0.05)
    meth.finalize(m)
    zeros = int((m.b1.weight == 0).sum() + (m.b2.weight == 0).sum())
    before = _eval(m)
    gs = build_groups(m, X[:2], [])
    p = plan(m, gs, PruneSpec(target="threshold", amount=1e-30, min_channels=1), "max", X[:2])
    apply(m, gs, p.remove, calib=[X])
    return zeros, p.removed_channels, float((_eval(m) - before).abs().max())


def test_ista_training_zeros_channels_that_prune_away_exactly_without_padding():
    zeros, removed, dev = _ista_train_and_prune(pad=0)
    assert 0 < zeros < 16 and removed == zeros
    assert dev <= 1e-5, dev
    zeros_p, removed_p, dev_pad = _ista_train_and_prune(pad=1)
    print(f"ISTA prune deviation: no padding {dev:.2e}; zero padding {dev_pad:.2e} ({removed_p} channels)")
    assert removed_p > 0 and dev_pad > 1e-4  # zero padding: the constant ReLU(β) differs at the borders


# --- receding ---------------------------------------------------------------------------------------

def test_receding_gradient_is_kappa_times_analytic_derivative():
    m = _model()
    meth = _make("receding", m, strength=0.01, offset=3.0)
    meth.prepare(m)
    w = torch.tensor([-6.0, -3.0, -1.0, 0.0, 0.5, 2.0, 5.0, -120.0])
    with torch.no_grad():
        m.b1.weight.copy_(w)
    m.train()
    m(X).sum().backward()
    g0 = m.b1.weight.grad.clone()
    meth.after_backward()
    for i, wi in enumerate(w.tolist()):
        s = 1 / (1 + math.exp(-(wi + 3.0)))
        want = 0.01 * -math.log(s) * s * (1 - s)  # d/dw s(1 − ln s) = −ln(s)·s·(1 − s)
        assert abs(float(m.b1.weight.grad[i] - g0[i]) - want) < 1e-8, i
    ref = w.clone().requires_grad_(True)
    (0.01 * regularizer(ref, 3.0)).backward()
    assert torch.allclose(m.b1.weight.grad - g0, ref.grad.nan_to_num(0.0), atol=1e-7)
    assert torch.isfinite(m.b1.weight.grad).all()  # w = −120: sigmoid underflows, still finite


@pytest.mark.parametrize("cls", [Net, Res])
def test_receding_steered_start_pushes_the_median_channel_like_l1s_default(cls):
    """A steered run starts receding at the κ whose push moves the median channel's importance, in the
    upload's γ units, by L1's default λ per unit of lr: the paper's κ barely moves a trained net's γ, which
    sit near the largest (b = 3: push ~10⁻⁵), and the controller reached its cap with nothing moved."""
    m = _model(cls)
    meth = _make("receding", m)
    paper = meth.strength
    meth.prepare(m)
    kappa = meth.steered_start()
    assert kappa > paper
    meth.strength = kappa
    bns = [b for b in m.modules() if isinstance(b, BoundedBatchNorm2d)]
    w = torch.cat([b.weight.detach().reshape(-1) for b in bns])
    med = w.median()
    m.train()
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    meth.after_backward()  # the push alone (no loss backward)
    pushes = torch.cat([b.weight.grad.reshape(-1) for b in bns])
    at = int((w == med).nonzero()[0])
    moved = float(pushes[at]) * float(torch.sigmoid(med) * (1 - torch.sigmoid(med))) * meth.scale
    assert abs(moved - 1e-4) < 1e-7, moved
    if cls is Net:  # a plain chain (b = 3), γ spread over 0.1–1.6: the paper's κ is decades short
        assert kappa > 10 * paper


def test_receding_defaults_follow_architecture():
    chain = _make("receding", _model())
    res = _make("receding", _model(Res))
    assert (chain.strength, chain.offset) == (1e-3, 3.0)  # VGG-like
    assert (res.strength, res.offset) == (1e-4, 0.0)  # residual
    assert _make("receding", _model(), offset=0.0).offset == 0.0  # explicit spec wins


def test_receding_swap_keeps_eval_outputs_and_finalize_is_the_same_function():
    m = _model(pad=1)
    with torch.no_grad():
        m.b1.weight[2] = -0.7  # negative γ: flipped at c1
        m.b2.weight[7] = 2.5  # γ > 1: the global scale goes to the running statistics
    before = _eval(m)
    meth = _make("receding", m, example=X[:2])
    b1 = m.b1
    meth.prepare(m)
    assert type(m.b1) is BoundedBatchNorm2d and m.b1 is b1  # same object: groups and TP graph stay valid
    assert not m.b1.bias.requires_grad and torch.equal(m.b1.bias, torch.zeros(8))
    assert torch.allclose(_eval(m), before, atol=1e-5)
    assert meth.describe()["inexact_sign_flips"] == 0
    imp = meth.importance_of(m.b2)
    assert abs(float(imp.max()) - 0.9) < 1e-6 and int(imp.argmax()) == 7
    bounded = copy.deepcopy(m)
    meth.finalize(m)
    assert type(m.b1) is nn.BatchNorm2d and m.b1.bias.requires_grad
    assert torch.equal(m.b1.weight, torch.sigmoid(bounded.b1.weight))
    assert torch.equal(_eval(m), _eval(bounded))
    m.train()
    bounded.train()
    with torch.no_grad():
        assert torch.equal(m(X), bounded(X))  # train mode too (batch statistics)


def test_torch_pruning_prunes_a_bounded_bn():
    m = _model()
    meth = _make("receding", m)
    meth.prepare(m)
    gs = meth.ctx.groups
    gid = next(g.gid for g in gs.groups if any(b.module is m.b1 for b in g.bns))
    apply(m, gs, {gid: torch.tensor([0, 1])}, calib=None)
    assert m.b1.num_features == 6 and m.b1.weight.shape == (6,) and m.b1.running_var.shape == (6,)
    assert _eval(m).shape == (16, 3)


# --- polarization -----------------------------------------------------------------------------------

def test_polarization_gradient_matches_penalty_and_hand_value():
    m = _model()
    meth = _make("polarization", m, strength=0.1, t=1.2)
    with torch.no_grad():
        m.b1.weight.copy_(torch.tensor([0.0, 0.1, 0.2, 0.9, 0.3, 0.8, 0.05, 1.0]))
        m.b2.weight.copy_(torch.tensor([0.6, 0.7, 0.0, 0.4, 0.5, 0.95, 0.15, 0.25]))
    m.train()
    m(X).sum().backward()
    g0 = [m.b1.weight.grad.clone(), m.b2.weight.grad.clone()]
    meth.after_backward()
    delta = torch.cat([m.b1.weight.grad - g0[0], m.b2.weight.grad - g0[1]])
    flat = torch.cat([m.b1.weight, m.b2.weight]).detach().requires_grad_(True)
    (0.1 * penalty(flat, 1.2)).backward()
    assert torch.allclose(delta, flat.grad, atol=1e-7)
    # by hand: mean γ = 6.9/16 = 0.43125; 7 of 16 above it, 9 below: Σ sign(γ − γ̄)/n = −2/16
    assert abs(float(delta[3]) - 0.1 * (1.2 - 1 - 2 / 16)) < 1e-7  # γ = 0.9, above the mean
    assert abs(float(delta[1]) - 0.1 * (1.2 + 1 - 2 / 16)) < 1e-7  # γ = 0.1, below
    assert abs(float(delta[0]) - 0.1 * (0.0 + 1 - 2 / 16)) < 1e-7  # γ = 0: sign(0) = 0
    with torch.no_grad():
        m.b1.weight[0], m.b1.weight[1] = -0.3, 1.7
    meth.after_step(0.1)
    assert m.b1.weight[0].item() == 0.0 and m.b1.weight[1].item() == 1.0


def test_polarization_prepare_rescales_a_trained_model_into_unit_range_keeping_outputs():
    m = _model(Res)
    with torch.no_grad():
        m.b1.weight[3] = -0.4
    before = _eval(m)
    meth = _make("polarization", m, example=X[:2])
    meth.prepare(m)
    gammas = torch.cat([m.b0.weight, m.b1.weight, m.b2.weight]).detach()
    assert float(gammas.min()) >= 0 and abs(float(gammas.max()) - 1) < 1e-6
    assert torch.allclose(_eval(m), before, atol=1e-5)
    fresh = fx.symbolic_trace(Net())
    meth = _make("polarization", fresh)
    meth.prepare(fresh)
    assert torch.equal(fresh.b1.weight, torch.full((8,), 0.5))  # untrained: the paper's init


def test_first_valley_on_bimodal_and_unimodal_histograms():
    g = torch.Generator().manual_seed(0)
    low = (torch.rand(200, generator=g) * 0.04).abs()
    high = 0.6 + 0.2 * torch.rand(300, generator=g)
    thr = first_valley_threshold(torch.cat([low, high]))
    assert thr is not None and 0.04 < thr < 0.6
    u = torch.linspace(0.001, 0.999, 500)
    normal = 0.5 + 0.1 * math.sqrt(2) * torch.erfinv(2 * u - 1)  # quantiles: one smooth mode
    assert first_valley_threshold(normal) is None
    assert first_valley_threshold(-0.1 * torch.log1p(-u)) is None  # exponential: decreasing, no valley
    assert first_valley_threshold(torch.ones(10)) is None


# --- group lasso ------------------------------------------------------------------------------------

def test_group_lasso_gradient_matches_a_slow_reference_loop():
    m = _model(Res)
    with torch.no_grad():
        m.b0.weight.copy_(torch.linspace(-0.5, 1.0, 8))
        m.b2.weight.copy_(torch.linspace(0.3, -0.2, 8))
        m.b1.weight[4] = 0.0
    meth = _make("group_lasso", m, strength=0.05)
    m.train()
    m(X).sum().backward()
    g0 = {n: p.grad.clone() for n, p in m.named_parameters()}
    meth.after_backward()
    ref = {n: torch.zeros_like(p) for n, p in m.named_parameters()}
    names = {id(mod): n for n, mod in m.named_modules()}
    for grp in build_groups(m, X[:2], []).groups:
        for r in range(grp.size):
            vals = [(b, int(b.bn_idx[k])) for b in grp.bns for k in range(len(b.root_idx)) if b.root_idx[k] == r]
            norm = math.sqrt(sum(b.module.weight[i].item() ** 2 for b, i in vals))
            for b, i in vals:
                if norm > 0:
                    ref[names[id(b.module)] + ".weight"][i] += 0.05 * b.module.weight[i].item() / norm
    for n, p in m.named_parameters():
        assert torch.allclose(p.grad - g0[n], ref[n], atol=1e-7), n
    assert float(m.b1.weight.grad[4] - g0["b1.weight"][4]) == 0.0  # a zero group is left alone
    assert meth.reduce == "mean"


# --- importance hooks, pilot, plateau ---------------------------------------------------------------

def test_channel_importance_and_sparsity_hooks():
    m = _model()
    meth = _make("l1", m)
    gs = build_groups(m, X[:2], [])
    assert torch.equal(meth.channel_importance(gs), torch.cat([g.importance("max") for g in gs.groups]))
    assert meth.sparsity(gs, threshold=0.35) == 4 / 16  # 0.1, 0.31 in each of the two BNs


def test_channel_importance_in_one_flat_pass_matches_each_group():
    """``channel_importance`` reads all groups through one flat index (the controller calls it about a hundred
    times a run): on a torchvision ResNet-18, whose residual groups span several BNs, it equals each group's own
    ``importance`` for both reductions, and a changed model or GroupSet is read afresh, not from the index."""
    import torchvision

    from slimcore.methods import Method

    m = fx.symbolic_trace(torchvision.models.resnet18(num_classes=10).eval())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for b in m.modules():
            if isinstance(b, nn.BatchNorm2d):
                b.weight.copy_(torch.rand(b.weight.shape, generator=gen) * 2 - 1)
    gs = build_groups(m, torch.randn(1, 3, 32, 32), [])
    meth = Method()
    for reduce in ("max", "mean"):
        meth.reduce = reduce
        want = torch.cat([g.importance(reduce) for g in gs.groups])
        assert torch.allclose(meth.channel_importance(gs), want, rtol=1e-6, atol=0)
    with torch.no_grad():  # the γ move between calls (training): the next read sees them
        next(b for b in m.modules() if isinstance(b, nn.BatchNorm2d)).weight.mul_(0.5)
    assert torch.allclose(meth.channel_importance(gs), torch.cat([g.importance("mean") for g in gs.groups]))
    pruned = copy.deepcopy(m)
    gs2 = build_groups(pruned, torch.randn(1, 3, 32, 32), [])
    first = gs2.groups[0]
    apply(pruned, gs2, {first.gid: torch.arange(first.size // 2)}, calib=None)
    gs3 = build_groups(pruned, torch.randn(1, 3, 32, 32), [])
    assert torch.allclose(meth.channel_importance(gs3), torch.cat([g.importance("mean") for g in gs3.groups]))


def test_pilot_bisects_in_log_space_with_few_runs():
    calls: list[float] = []

    def run(s: float) -> float:  # monotone: fraction rises linearly in log10(s), 0.5 at s = 3e-4
        calls.append(s)
        return min(1.0, max(0.0, 0.5 + (math.log10(s) - math.log10(3e-4)) / 3))

    s = pilot_strength("l1", run, target_fraction=0.5, candidates=6, tol=0.02)
    assert len(calls) <= 6 and abs(run(s) - 0.5) <= 0.02
    assert calls[0] == pytest.approx(1e-4)  # first run at the middle decade of 1e-6 … 1e-2
    calls.clear()
    step = pilot_strength("ista", lambda s: 0.0 if s < 3e-3 else 0.9, 0.4, candidates=4)
    assert 3e-3 <= step < 1e-2  # no run within tol: the weakest that reached the target


def test_pilot_goes_lower_after_a_damaging_run_and_never_returns_it():
    calls: list[float] = []

    def run(s: float) -> float | None:  # ≥ 1e-3 wrecks the network; below, sparsity grows with s
        calls.append(s)
        return None if s >= 1e-3 else min(1.0, s / 1e-3)

    s = pilot_strength("l1", run, target_fraction=0.9, candidates=5, tol=0.01)
    first_bad = next(i for i, c in enumerate(calls) if c >= 1e-3)
    assert s < 1e-3 and calls[first_bad + 1] < calls[first_bad]  # after a damaging run the search goes lower
    assert s == max(c for c in calls if c < 1e-3)  # none reached 0.9: the strongest safe one
    assert pilot_strength("l1", lambda s: None, 0.5, candidates=3) == pytest.approx(10 ** -5.5)  # all damaged


def test_schedule_range_tracks_the_schedule():
    from slimcore.strength import schedule_range

    short = schedule_range("l1", 0.5, lr=0.02, momentum=0.9, steps=40)
    long = schedule_range("l1", 0.5, lr=0.02, momentum=0.9, steps=4000)
    assert long[0] == pytest.approx(short[0] / 100) and short[0] < short[1] <= 10
    # ISTA's γ step has no momentum: the same push needs 10× the strength
    assert schedule_range("ista", 0.5, 0.02, 0.9, 4000)[0] == pytest.approx(long[0] * 10)


def test_sparsity_plateau_waits_for_sparsity_then_stops_when_flat():
    p = SparsityPlateau(patience=2, tol=0.01)
    assert [p.update(f) for f in (0.0, 0.0, 0.0)] == [False] * 3  # still building up: not a plateau
    assert [p.update(f) for f in (0.2, 0.35, 0.40, 0.405, 0.41)] == [False, False, False, False, True]
    p.reset()
    assert p.history == []
