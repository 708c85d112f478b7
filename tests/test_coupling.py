"""Our channel-dependency analysis on every coupling real architectures use, on files saved as users save them.

The property (issue 10): for random removal sets, the pruned model runs, and where the removed channels
are exactly zero (γ = 0, β = 0, so they output relu(0) = 0) its output equals the original's. A wrong
split size, a concat offset that drifted, a grouped conv that lost part of a group or a slice bound that
was not rewritten all break it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from slimcore.groups import build_groups
from slimcore.lift import IMPORTERS
from slimcore.pipeline import _load_plugins
from slimcore.prune import _floor, apply
from tests.zoo import randomize_bn

_load_plugins()


def cbr(i: int, o: int, k: int = 3, g: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(i, o, k, padding=k // 2, groups=g, bias=False), nn.BatchNorm2d(o), nn.ReLU())


class CSP(nn.Module):
    """CSP / C2f: a conv whose output is split (and chunked), the pieces processed apart and concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 16)
        self.cv1 = cbr(16, 32, 1)
        self.m = nn.ModuleList([cbr(16, 16), cbr(16, 16)])  # named `m`, as ultralytics names it
        self.cv2 = cbr(64, 24, 1)
        self.head = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(self.stem(x)).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        a, b = self.cv2(torch.cat(y, 1)).split([8, 16], 1)
        return self.head(torch.cat([a, b], 1).mean((2, 3)))


class Res2(nn.Module):
    """Res2Net: split into scales, each conv fed by its piece plus the previous scale's output."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.convs, self.c3 = cbr(3, 32, 1), nn.ModuleList([cbr(8, 8) for _ in range(3)]), cbr(32, 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = torch.split(self.c1(x), 8, 1)
        out, sp = [], xs[0]
        for i, conv in enumerate(self.convs):
            sp = conv(sp if i == 0 else sp + xs[i])
            out.append(sp)
        return self.c3(torch.cat(out + [xs[3]], 1))


class Ghost(nn.Module):
    """GhostNet: a primary conv, a cheap depthwise conv of it, concatenated and sliced to the wanted width."""

    def __init__(self) -> None:
        super().__init__()
        self.primary, self.cheap = cbr(3, 7, 1), cbr(7, 7, 3, g=7)
        self.se_r, self.se_e = nn.Conv2d(12, 4, 1), nn.Conv2d(4, 12, 1)
        self.out = cbr(12, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.primary(x)
        y = torch.cat([a, self.cheap(a)], 1)[:, :12]
        y = y * torch.sigmoid(self.se_e(torch.relu(self.se_r(y.mean((2, 3), keepdim=True)))))
        return self.out(y)


class Grouped(nn.Module):
    """ResNeXt/RegNet: a grouped 3×3 between 1×1s, in a residual block; then flatten → linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 16)
        self.a, self.b, self.c = cbr(16, 32, 1), cbr(32, 32, 3, g=4), nn.Sequential(nn.Conv2d(32, 16, 1, bias=False),
                                                                                   nn.BatchNorm2d(16))
        self.fc = nn.Linear(16 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        y = torch.relu(s + self.c(self.b(self.a(s))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 4), 1))


class FPN(nn.Module):
    """A detection neck: upsample, concatenate with a skip, two outputs of different strides."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = cbr(3, 8), cbr(8, 16), cbr(24, 8)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p1 = self.c1(x)
        p2 = self.c2(self.pool(p1))
        up = nn.functional.interpolate(p2, scale_factor=2.0, mode="nearest")
        return self.c3(torch.cat([up, p1], 1))


MODELS = {"csp": CSP, "res2": Res2, "ghost": Ghost, "grouped": Grouped, "fpn": FPN}


def save(m: nn.Module, fmt: str, path: Path, x: torch.Tensor) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "pt2":
            torch.export.save(torch.export.export(m, (x,)), path)
        else:
            torch.jit.save(torch.jit.trace(m, x) if fmt == "trace" else torch.jit.script(m), path)
    return path


def lifted(m: nn.Module, fmt: str, tmp_path: Path, shape: tuple[int, ...] = (1, 3, 16, 16)):
    randomize_bn(m.eval())
    p = save(m, fmt, tmp_path / f"m.{fmt}", torch.randn(shape))
    return IMPORTERS.get("pt2" if fmt == "pt2" else "torchscript")(p, shape)


def zero_and_prune(gm: nn.Module, gs, seed: int) -> tuple[torch.Tensor, dict]:
    """Zero γ and β of a random removal set (respecting the floors), return it and the output before."""
    g = torch.Generator().manual_seed(seed)
    remove = {}
    with torch.no_grad():
        for grp in gs.groups:
            n = grp.size - _floor(grp.size, 1)
            k = int(torch.randint(0, n + 1, (1,), generator=g)) if n > 0 else 0
            if k:
                idx = torch.randperm(grp.size, generator=g)[:k].sort().values
                remove[grp.gid] = idx
                for b in grp.bns:
                    sel = b.bn_idx[torch.isin(b.root_idx, idx)]
                    b.module.weight[sel] = 0
                    b.module.bias[sel] = 0
    return remove


@pytest.mark.parametrize("fmt", ["trace", "pt2"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_random_removals_keep_the_function_when_removed_channels_are_zero(name, fmt, tmp_path):
    torch.manual_seed(0)
    imp = lifted(MODELS[name](), fmt, tmp_path)
    x = torch.randn(3, 3, 16, 16)
    removed = 0
    for seed in range(3):
        gm = imp.module
        gs = build_groups(gm, x[:2], [], imp.meta.get("unprunable"))
        remove = zero_and_prune(gm, gs, seed)
        with torch.no_grad():
            ref = gm.eval()(x)
            apply(gm, gs, remove, None)
            out = gm(x)
        assert out.shape == ref.shape
        assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5), (name, fmt, seed, float((out - ref).abs().max()))
        removed += sum(v.numel() for v in remove.values())
    assert removed > 0


def test_grouped_convolution_loses_whole_groups(tmp_path):
    imp = lifted(Grouped(), "pt2", tmp_path)
    gm, x = imp.module, torch.randn(2, 3, 16, 16)
    gs = build_groups(gm, x, [])
    conv = next(m for m in gm.modules() if isinstance(m, nn.Conv2d) and m.groups == 4)
    grp = next(g for g in gs.groups if any(mod is conv for mod, _, _ in g.members))
    assert grp.size == 4 and float(grp.weight[0]) == 8  # one component per group of 8 channels
    apply(gm, gs, {grp.gid: torch.tensor([1, 2])}, [x])
    assert (conv.groups, conv.in_channels, conv.out_channels) == (2, 16, 16)
    assert gm(x).shape == (2, 3)


def test_split_sizes_and_slice_bounds_follow_the_pruned_counts(tmp_path):
    imp = lifted(CSP(), "pt2", tmp_path)
    gm, x = imp.module, torch.randn(2, 3, 16, 16)
    gs = build_groups(gm, x, [])
    cv2 = next(g for g in gs.groups if "cv2.0" in g.layers and g.size == 8)  # the first piece of the last split
    apply(gm, gs, {cv2.gid: torch.arange(3)}, [x])
    split = [n for n in gm.graph.nodes if "split" in str(n.target)][-1]
    assert split.args[1] == [5, 16]
    assert gm(x).shape == (2, 5)


def test_channels_reaching_an_op_without_a_rule_stay_with_the_reason(tmp_path):
    class Rolled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = cbr(3, 8), cbr(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.roll(self.a(x), 1, 1))  # rolls channels: no rule follows it

    imp = lifted(Rolled(), "pt2", tmp_path)
    with pytest.raises(Exception, match="roll"):
        build_groups(imp.module, torch.randn(2, 3, 16, 16), [])


def test_torch_pruning_agrees_on_resnet18_groups():
    """Cross-check with Torch-Pruning where it is right (plain residual nets): the same convolutions lose
    output channels together."""
    import torch_pruning as tp

    m = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    x = torch.randn(1, 3, 32, 32)
    ours = {frozenset(g.layers) for g in build_groups(m, x, []).groups}
    dg = tp.DependencyGraph().build_dependency(m, example_inputs=x)
    names = {mod: n for n, mod in m.named_modules()}
    theirs = set()
    for g in dg.get_all_groups(ignored_layers=[m.fc], root_module_types=(nn.Conv2d, nn.Linear)):
        outs = {names[it.dep.target.module] for it in g.items if dg.is_out_channel_pruning_fn(it.dep.handler)
                and isinstance(it.dep.target.module, nn.Conv2d)}
        theirs.add(frozenset(outs))
    assert ours == theirs


def _zoo_property(name: str, fmt: str, tmp_path: Path) -> None:
    from slimcore import io as sio
    from slimcore.formats import detect_format
    from tests.zoo_models import BY_NAME, save

    entry = BY_NAME[name]
    path = save(entry, fmt, tmp_path / ("m.onnx" if fmt.startswith("onnx") else f"m.{fmt}"))
    imp = IMPORTERS.get(detect_format(path))(path, entry.shape)
    gm = imp.module.eval()
    x = torch.randn((2, *entry.shape[1:]), generator=torch.Generator().manual_seed(2))
    gs = build_groups(gm, x, [], imp.meta.get("unprunable"))
    remove = zero_and_prune(gm, gs, seed=0)
    with torch.no_grad():
        ref = gm(x)
        apply(gm, gs, remove, None)
        out = gm(x)
    assert sio.structure(out) == sio.structure(ref)
    for a, b in zip(sio.leaves(out), sio.leaves(ref), strict=True):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4 * float(b.abs().max()) + 1e-6), name


@pytest.mark.parametrize("name", ["timm/cs3darknet_s", "timm/ghostnet_100"])
def test_real_splits_and_slices_keep_the_function(name, tmp_path):
    """Two real architectures with the couplings Torch-Pruning broke (CSP splits; Ghost slices)."""
    _zoo_property(name, "pt2", tmp_path)


def _zoo_names() -> list:
    from tests.zoo_models import ENTRIES

    return [pytest.param(e.name, marks=pytest.mark.zoo, id=e.name) for e in ENTRIES if e.applies("pt2")]


@pytest.mark.parametrize("name", _zoo_names())
def test_zoo_random_removals_keep_the_function(name, tmp_path):
    """The property on every zoo model (``-m zoo``): random removal sets of zeroed channels change nothing."""
    _zoo_property(name, "pt2", tmp_path)
