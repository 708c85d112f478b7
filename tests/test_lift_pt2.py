"""torch.export (.pt2) in and out: lift every zoo architecture, prune it with Torch-Pruning, export it.

Each architecture case runs the whole round trip because that is what can break: a size baked into
the exported graph only shows once channels are gone, and a re-export that specialized the batch only
shows at a second batch size.
"""

from __future__ import annotations

import dataclasses
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from slimcore.errors import ParityError, SlimError, UnsupportedModel
from slimcore.export import rel_error
from slimcore.export.pt2 import export_pt2
from slimcore.lift.exported import import_pt2
from tests.zoo import input_shape, make_model, prune_two_per_group, randomize_bn, save_model

LIGHT = ["smallcnn", "resnet18"]  # the rest take 15-40 s each on two cores
BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The zoo model ``name`` as an uploaded .pt2, written once per module (exporting is the slow part)."""
    root = tmp_path_factory.mktemp("pt2")

    def get(name: str) -> Path:
        path = root / f"{name}.pt2"
        if not path.exists():
            with torch.no_grad():
                save_model(make_model(name), "pt2", path, _x(name, 1))
        return path

    return get


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # Two cores shared with other jobs: intra-op threads oversubscribe and runs get 10-50x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _x(name: str, batch: int, seed: int = 0) -> torch.Tensor:
    shape = input_shape(name)
    return torch.randn((batch, *shape[1:]), generator=torch.Generator().manual_seed(seed))


def _case(name: str, path: Path, tmp_path: Path) -> None:
    model = make_model(name)

    imp = import_pt2(path, None)
    assert imp.fmt == "pt2" and imp.input_shape == input_shape(name) and imp.input_name == "x"
    assert imp.dynamic_batch and imp.meta["batch_dim"]["min"] == 1 and imp.meta["batch_dim"]["max"] == 1024
    gm = imp.module
    assert not gm.training
    for batch in (2, 5):
        x = _x(name, batch, seed=batch)
        with torch.no_grad():
            want = model(x)
            assert rel_error(gm(x), want) <= 1e-5
        assert rel_error(imp.original(x), want) <= 1e-5
    count = sum(isinstance(m, BN) for m in model.modules())
    assert sum(isinstance(m, BN) for m in gm.modules()) == count

    ex = _x(name, 2)
    assert prune_two_per_group(gm, ex, imp.meta["unprunable"]) > 0
    assert sum(isinstance(m, BN) for m in gm.modules()) == count
    with torch.no_grad():
        assert gm(ex).shape == (2, *want.shape[1:])

    out = tmp_path / f"{name}_pruned.pt2"
    export_pt2(gm, imp, out, _x(name, 1))
    ep = torch.export.load(str(out))
    (sym,) = [s for s, r in ep.range_constraints.items() if (int(r.lower), int(r.upper)) == (1, 1024)]
    ph = [n for n in ep.graph.nodes if n.op == "placeholder"][-1]
    assert ph.meta["val"].shape[0].node.expr == sym
    assert ep.module_call_graph[0].signature.forward_arg_names == ["x"]
    prog = ep.module()
    for batch in (2, 5):
        x = _x(name, batch, seed=10 + batch)
        with torch.no_grad():
            assert rel_error(prog(x), gm(x)) <= 1e-4


@pytest.mark.parametrize("name", LIGHT)
def test_pt2_round_trip(name: str, saved: Callable[[str], Path], tmp_path: Path) -> None:
    _case(name, saved(name), tmp_path)


# The other architectures are covered by tests/test_arch_matrix.py (same checks plus the global planner).


@pytest.mark.heavy
def test_channel_shuffle_is_followed(saved: Callable[[str], Path]) -> None:
    """ShuffleNet's shuffle sizes follow the tensor at run time, and pruning across it keeps a valid shuffle:
    nothing is fenced, and removed channels that were zero leave the output unchanged."""
    from slimcore.groups import build_groups
    from slimcore.prune import apply

    name = "shufflenet_v2_x0_5"
    imp = import_pt2(saved(name), None)
    assert imp.meta["unprunable"] == {}
    gm, ex = imp.module, _x(name, 2)
    gs = build_groups(gm, ex, [])
    assert gs.coverage["prunable"] == gs.coverage["total"]
    crossing = next(g for g in gs.groups if "stage2.0.branch2.5" in g.layers)
    apply(gm, gs, {crossing.gid: torch.tensor([0])}, None)
    with torch.no_grad():
        assert gm(ex).shape[0] == 2


class _Shuffle(nn.Module):
    """A channel shuffle written the torchvision way, between two conv-BN blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn1(self.conv1(x)).relu()
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        y = nn.functional.adaptive_avg_pool2d(self.bn2(self.conv2(y)).relu(), 1)
        return self.fc(y.view(n, -1))


def test_small_channel_shuffle(tmp_path: Path) -> None:
    from slimcore.groups import build_groups
    from slimcore.prune import apply

    model = randomize_bn(_Shuffle()).eval()
    path = save_model(model, "pt2", tmp_path / "s.pt2", torch.randn(1, 1, 8, 8))
    imp = import_pt2(path, None)
    gm = imp.module
    assert imp.meta["unprunable"] == {}
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert "aten.as_strided" not in targets and "sym_size" in gm.code  # shuffle sizes follow the tensor
    x = _x("smallcnn", 4, seed=3)
    with torch.no_grad():
        assert rel_error(gm(x), model(x)) <= 1e-5
    gs = build_groups(gm, x, [])
    g1 = next(g for g in gs.groups if g.layers == ["conv1"])
    assert g1.size == 4 and float(g1.weight[0]) == 2  # conv1's 8 channels go in shuffle columns of two
    g2 = next(g for g in gs.groups if g.layers == ["conv2"])
    apply(gm, gs, {g1.gid: torch.tensor([1]), g2.gid: torch.tensor([0, 5])}, None)
    assert gm.get_submodule("m.conv1").out_channels == 6 and gm.get_submodule("m.fc").in_features == 6
    with torch.no_grad():
        assert gm(x).shape == (4, 3)
    export_pt2(gm, imp, tmp_path / "o.pt2", x[:1])


def test_corrupt_file_is_a_slim_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not a zip archive at all")
    with pytest.raises(SlimError) as e:
        import_pt2(bad, None)
    assert "\n" not in str(e.value)
    truncated = tmp_path / "trunc.pt2"
    with zipfile.ZipFile(truncated, "w") as z:
        z.writestr("archive/version", "0")
    with pytest.raises(SlimError):
        import_pt2(truncated, None)


def test_input_shape_is_checked(saved: Callable[[str], Path]) -> None:
    path = saved("smallcnn")
    assert import_pt2(path, (4, 1, 8, 8)).input_shape == (1, 1, 8, 8)
    with pytest.raises(SlimError, match="does not match"):
        import_pt2(path, (1, 3, 8, 8))


def test_static_batch(tmp_path: Path) -> None:
    model = make_model("smallcnn")
    ep = torch.export.export(model, (_x("smallcnn", 3),))
    torch.export.save(ep, str(tmp_path / "s.pt2"))
    imp = import_pt2(tmp_path / "s.pt2", None)
    assert not imp.dynamic_batch and imp.input_shape == (3, 1, 8, 8)
    export_pt2(imp.module, imp, tmp_path / "o.pt2", _x("smallcnn", 1))
    prog = torch.export.load(str(tmp_path / "o.pt2")).module()
    x = _x("smallcnn", 3, seed=4)
    with torch.no_grad():
        assert rel_error(prog(x), model(x)) <= 1e-5


def test_export_keeps_the_input_name(saved: Callable[[str], Path], tmp_path: Path) -> None:
    imp = dataclasses.replace(import_pt2(saved("smallcnn"), None), input_name="pixels")
    export_pt2(imp.module, imp, tmp_path / "o.pt2", _x("smallcnn", 1))
    ep = torch.export.load(str(tmp_path / "o.pt2"))
    assert ep.module_call_graph[0].signature.forward_arg_names == ["pixels"]
    x = _x("smallcnn", 3, seed=2)
    with torch.no_grad():
        assert rel_error(ep.module()(x), imp.module(x)) <= 1e-5
    assert [n.target for n in imp.module.graph.nodes if n.op == "placeholder"] == ["x"]  # not renamed


class _TwoIn(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class _TwoOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.conv(x)
        return y, y.relu()


class _TupleOut(_TwoOut):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:  # type: ignore[override]
        return (self.conv(x),)


class _CountOut(_TwoOut):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:  # type: ignore[override]
        return self.conv(x), 3


def test_signatures_keep_their_form(tmp_path: Path) -> None:
    """Several inputs keep their names and order, tuple outputs their arity (a 1-tuple stays one, as the
    upload returns it); outputs that are not tensors are refused in one line."""
    x = torch.randn(2, 1, 8, 8)
    torch.export.save(torch.export.export(_TwoIn(), (x, x.clone())), str(tmp_path / "a.pt2"))
    imp = import_pt2(tmp_path / "a.pt2", None)
    assert imp.input_names == ("a", "b") and imp.input_shapes == ((2, 1, 8, 8), (2, 1, 8, 8))
    assert torch.equal(imp.module(x, 2 * x), 3 * x)
    torch.export.save(torch.export.export(_TwoOut().eval(), (x,)), str(tmp_path / "b.pt2"))
    imp = import_pt2(tmp_path / "b.pt2", None)
    out = imp.module(x)
    assert isinstance(out, tuple) and len(out) == 2 and torch.equal(out[1], out[0].relu())
    torch.export.save(torch.export.export(_TupleOut().eval(), (x,)), str(tmp_path / "c.pt2"))
    imp = import_pt2(tmp_path / "c.pt2", None)
    assert isinstance(imp.original(x), tuple) and isinstance(imp.module(x), tuple) and len(imp.module(x)) == 1
    torch.export.save(torch.export.export(_CountOut().eval(), (x,)), str(tmp_path / "d.pt2"))
    with pytest.raises(UnsupportedModel, match="not tensors") as e:
        import_pt2(tmp_path / "d.pt2", None)
    assert "\n" not in str(e.value)


def test_exporter_rejects_a_module_it_cannot_reproduce(saved: Callable[[str], Path], tmp_path: Path) -> None:
    imp = import_pt2(saved("smallcnn"), None)

    class Flaky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = imp.module

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.inner(x)
            return y * 2 if torch.compiler.is_exporting() else y  # what gets written is not what ran

    with pytest.raises(ParityError):
        export_pt2(Flaky(), imp, tmp_path / "o.pt2", _x("smallcnn", 1))
