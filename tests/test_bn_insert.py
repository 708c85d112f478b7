"""BatchNorm re-insertion for BN-folded models, and folding back for export.

The folded models are built independently of the code under test: torchvision models with
``torch.fx.experimental.optimization.fuse`` (Conv+BN folded), saved as a torch.export program and lifted,
which is what an ONNX upload without BatchNorm looks like once imported.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.fx as fx
from torch import nn
from torch.fx.experimental.optimization import fuse

from slimcore.export import rel_error
from slimcore.groups import all_bns, build_groups
from slimcore.lift.bn_insert import META_KEY, fold_bn, reinsert_bn
from slimcore.lift.exported import import_pt2
from slimcore.prune import apply, plan
from slimcore.spec import PruneSpec
from tests.zoo import input_shape, make_model, save_model

torch.set_num_threads(1)

# (arch, convs that get a BN): every conv; the output layer is the Linear head. MobileNetV2 includes its
# 17 depthwise convs.
EXPECTED = {"resnet18": 20, "mobilenet_v2": 52}


def folded_lifted(arch: str, tmp_path) -> fx.GraphModule:
    shape = input_shape(arch)
    x = torch.randn((1, *shape[1:]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = save_model(fuse(make_model(arch)), "pt2", tmp_path / f"{arch}_folded.pt2", x)
        return import_pt2(path, shape).module


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def folded(request, tmp_path_factory):
    arch = request.param
    gm = folded_lifted(arch, tmp_path_factory.mktemp(arch))
    assert not all_bns(gm)
    return arch, gm


def test_reinsert_is_identity_and_counts(folded):
    arch, base = folded
    gm = copy.deepcopy(base)
    shape = input_shape(arch)
    calib = [torch.randn((4, *shape[1:]), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    fresh = torch.randn((3, *shape[1:]), generator=torch.Generator().manual_seed(9)) * 2 + 0.5
    with torch.no_grad():
        ref_calib, ref_fresh = base(calib[0]), base(fresh)
    names = reinsert_bn(gm, calib)
    assert len(names) == EXPECTED[arch] == len(gm.meta[META_KEY])
    assert all(not n.startswith("m.") for n in names)
    assert gm.meta[META_KEY] == {f"m.{n}_bn" for n in names}
    if arch == "mobilenet_v2":
        assert sum(gm.get_submodule(f"m.{n}").groups > 1 for n in names) == 17  # depthwise ones included
    gm.eval()
    with torch.no_grad():
        assert rel_error(gm(calib[0]), ref_calib) <= 1e-5
        assert rel_error(gm(fresh), ref_fresh) <= 1e-5  # identity for any input, not only the calibration data
    # γ is the channel's output scale on the calibration data
    bn = gm.get_submodule(f"m.{names[0]}_bn")
    y = _conv_output(gm, f"m.{names[0]}", calib)
    var = y.transpose(0, 1).flatten(1).double().var(1, unbiased=False)
    assert torch.allclose(bn.weight.double(), (var + bn.eps).sqrt(), rtol=1e-4)


def _conv_output(gm: fx.GraphModule, path: str, calib: list[torch.Tensor]) -> torch.Tensor:
    outs: list[torch.Tensor] = []
    h = gm.get_submodule(path).register_forward_hook(lambda m, a, o: outs.append(o.detach()))
    with torch.no_grad():
        for b in calib:
            gm(b)
    h.remove()
    return torch.cat(outs)


def test_groups_prune_and_train_step(folded):
    arch, base = folded
    gm = copy.deepcopy(base)
    shape = input_shape(arch)
    x = torch.randn((4, *shape[1:]), generator=torch.Generator().manual_seed(0))
    reinsert_bn(gm, [x])
    gs = build_groups(gm, x, [])
    assert len(gs.groups) >= (12 if arch == "resnet18" else 20)
    assert all(g.bns for g in gs.groups)
    # a train-mode step: γ of inserted BNs get gradients, running statistics move
    bn = gm.get_submodule(sorted(gm.meta[META_KEY])[0])
    before = bn.running_mean.clone()
    gm.train()
    opt = torch.optim.SGD(gm.parameters(), lr=1e-3)
    loss = nn.functional.cross_entropy(gm(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert torch.isfinite(loss) and bn.weight.grad is not None and bn.weight.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(before, bn.running_mean)
    gm.eval()
    p = plan(gm, gs, PruneSpec(target="channels", amount=0.3, min_channels=1), "max", x)
    apply(gm, gs, p.remove, calib=[x])
    assert p.removed_channels > 0
    with torch.no_grad():
        assert torch.isfinite(gm(x)).all()


def test_fold_back_is_exact(folded):
    arch, base = folded
    gm = copy.deepcopy(base)
    shape = input_shape(arch)
    x = torch.randn((2, *shape[1:]))
    reinsert_bn(gm, [x])
    with torch.no_grad():  # make the BNs non-trivial, as sparse training would
        for path in gm.meta[META_KEY]:
            bn = gm.get_submodule(path)
            bn.weight.mul_(torch.rand_like(bn.weight) + 0.5)
            bn.bias.add_(torch.randn_like(bn.bias) * 0.1)
    gm.eval()
    with torch.no_grad():
        ref = gm(x)
    folded_paths = fold_bn(gm, set(gm.meta[META_KEY]))
    assert len(folded_paths) == EXPECTED[arch] and not all_bns(gm) and gm.meta[META_KEY] == set()
    with torch.no_grad():
        assert rel_error(gm(x), ref) <= 1e-5


def test_fold_all_real_bns(tmp_path):
    shape = input_shape("resnet18")
    x = torch.randn((2, *shape[1:]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = import_pt2(save_model(make_model("resnet18"), "pt2", tmp_path / "r.pt2", x[:1]), shape).module
    with torch.no_grad():
        ref = gm(x)
    assert len(fold_bn(gm, None)) == 20 and not all_bns(gm)
    with torch.no_grad():
        assert rel_error(gm(x), ref) <= 1e-5


class _Rules(nn.Module):
    """Convs that must not get a BN (grouped, already BN-ed, output layer) next to ones that must."""

    def __init__(self) -> None:
        super().__init__()
        self.plain = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.with_bn = nn.Conv2d(8, 8, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.shared = nn.Conv2d(8, 8, 1)  # feeds a BN and a residual add: gets one
        self.bn2 = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.dead = nn.Conv2d(8, 4, 1)
        self.head = nn.Conv2d(4, 5, 1)  # output layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.with_bn(self.grouped(self.plain(x)))))
        s = self.shared(y)
        y = torch.relu(self.bn2(s)) + s
        return self.head(torch.relu(self.dead(self.depthwise(y))))


def _rules_gm() -> fx.GraphModule:
    torch.manual_seed(0)
    gm = fx.symbolic_trace(_Wrap(_Rules().eval()))  # modules under ``m``, as the lifters put them
    with torch.no_grad():
        gm.get_submodule("m.dead").weight[1].zero_()  # channel 1 outputs its bias for every input
    return gm.eval()


class _Wrap(nn.Module):
    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(x)


def test_which_convs_and_dead_channels():
    gm = _rules_gm()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        ref = gm(x)
    names = reinsert_bn(gm, [x])
    assert sorted(names) == ["dead", "depthwise", "plain", "shared"]
    with torch.no_grad():
        assert rel_error(gm(x), ref) <= 1e-5
    dead = gm.get_submodule("m.dead_bn")
    assert dead.weight[1] == 0 and dead.running_var[1] == 0  # all-zero filter: γ = 0, still exact
    assert (dead.weight[[0, 2, 3]] > 0).all()


def test_constant_calibration_keeps_gamma_positive():
    gm, ref = _rules_gm(), _rules_gm()  # same seed, same weights
    names = reinsert_bn(gm, [torch.zeros(2, 3, 8, 8)])  # every channel constant on this data
    bn = gm.get_submodule(f"m.{names[0]}_bn")
    assert torch.allclose(bn.weight, torch.full_like(bn.weight, bn.eps ** 0.5))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert rel_error(gm(x), ref(x)) <= 1e-5  # still the identity on data that does vary


def test_needs_calibration():
    with pytest.raises(ValueError):
        reinsert_bn(_rules_gm(), [])
