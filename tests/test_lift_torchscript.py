"""TorchScript in: lift scripted and traced zoo models, then prune and re-script the lifted graph.

Each architecture case goes as far as the exporter will: what breaks a lift is a size baked from the
example (shows only at another batch size or after channels are removed) and a graph that no longer
scripts once module widths change.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimcore.errors import ParityError, SlimError, UnsupportedModel
from slimcore.lift import IMPORTERS
from slimcore.lift.parity import check_parity, relative_error
from slimcore.lift.torchscript import import_torchscript
from tests.zoo import ARCHS, input_shape, make_model, prune_two_per_group, save_model

HEAVY = {"vgg11_bn", "densenet121"}  # > 15 s a case on two shared cores
BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # Two cores shared with other jobs: intra-op threads oversubscribe and runs get 10-50x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _x(name: str, batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn((batch, *input_shape(name)[1:]), generator=torch.Generator().manual_seed(seed))


def _case(name: str, fmt: str, tmp_path: Path) -> None:
    model = make_model(name)
    path = save_model(model, fmt, tmp_path / f"{name}.{fmt}.pt", _x(name, 1))
    imp = import_torchscript(path, input_shape(name))
    assert imp.fmt == "torchscript" and imp.input_shape == input_shape(name) and imp.input_name == "x"
    assert imp.dynamic_batch and "forward_schema" in imp.meta
    gm = imp.module
    assert not gm.training

    ex = _x(name, 2)
    assert check_parity(imp.original, gm, ex, rtol=1e-5) <= 1e-5
    x5 = _x(name, 5, seed=5)
    with torch.no_grad():
        want5 = model(x5)
        assert relative_error(imp.original(x5), want5) <= 1e-5
        assert relative_error(gm(x5), want5) <= 1e-5
    count = sum(isinstance(m, BN) for m in model.modules())
    assert sum(isinstance(m, BN) for m in gm.modules()) == count
    torch.jit.script(gm)

    assert prune_two_per_group(gm, ex, imp.meta["unprunable"]) > 0
    assert sum(isinstance(m, BN) for m in gm.modules()) == count
    scripted = torch.jit.script(gm)  # what the TorchScript exporter does with the pruned graph
    with torch.no_grad():
        y5 = gm(x5)
        assert y5.shape == want5.shape
        assert relative_error(scripted(x5), y5) <= 1e-5


@pytest.mark.parametrize("fmt", ["script", "trace"])
@pytest.mark.parametrize("name", ["smallcnn", *[a for a in ARCHS if a not in HEAVY]])
def test_torchscript_lift(name: str, fmt: str, tmp_path: Path) -> None:
    _case(name, fmt, tmp_path)


# The heavy architectures are covered by tests/test_arch_matrix.py (same checks plus pruning and export).


def test_registered() -> None:
    assert IMPORTERS.get("torchscript") is import_torchscript


def test_shuffle_is_followed_not_fenced(tmp_path: Path) -> None:
    """ShuffleNet's channel shuffle keeps run-time sizes as in the pt2 importer; nothing is fenced."""
    name = "shufflenet_v2_x0_5"
    path = save_model(make_model(name), "script", tmp_path / "s.pt", _x(name, 1))
    assert import_torchscript(path, input_shape(name)).meta["unprunable"] == {}


def test_corrupt_file_is_a_slim_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"definitely not a torchscript archive")
    state = tmp_path / "state.pt"
    torch.save(nn.Linear(2, 2).state_dict(), state)
    for p in (bad, state, tmp_path / "missing.pt"):
        with pytest.raises(SlimError) as e:
            import_torchscript(p, (1, 2))
        assert "\n" not in str(e.value) and "TorchScript" in str(e.value)


def test_input_shape_is_required(tmp_path: Path) -> None:
    path = save_model(make_model("smallcnn"), "script", tmp_path / "m.pt", _x("smallcnn", 1))
    with pytest.raises(SlimError, match="input_shape is required"):
        import_torchscript(path, None)
    with pytest.raises(SlimError, match="fails on an input of shape"):
        import_torchscript(path, (1, 3, 8, 8))  # SmallCNN takes one channel


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if bool(y.sum() > 0):
            y = y * 2
        return y


class _Looping(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(x.size(0)):
            x = x + 1
        return x


class _IntArg(nn.Module):
    def forward(self, x: torch.Tensor, k: int) -> torch.Tensor:
        return x * k


class _CountOut(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        return x, 3


@pytest.mark.parametrize(("module", "needle"), [
    (_Branchy(), "unsupported TorchScript op prim::If at node %"),
    (_Looping(), "unsupported TorchScript op prim::Loop at node %"),
    (_IntArg(), "must take tensor inputs only"),
    (_CountOut(), "supported: a tensor, or a tuple, list or dict"),
])
def test_unsupported_models_name_the_problem(module: nn.Module, needle: str, tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(module.eval()), str(path))
    with pytest.raises(UnsupportedModel) as e:
        import_torchscript(path, (1, 3, 8, 8))
    assert needle in str(e.value) and "\n" not in str(e.value)


class _Quirky(nn.Module):
    """Rank-dispatched library code, in-place writes through views, a bare parameter, an addmm head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.scale = nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5)
        self.w = nn.Parameter(torch.randn(5, 8 * 4 * 4))
        self.b = nn.Parameter(torch.randn(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x)) * self.scale
        y.add_(1)
        y[:, :1].mul_(0.5)  # result unused: only the later read of y depends on it
        y = F.interpolate(y, scale_factor=2.0, mode="nearest")  # branches and loops on y.dim() when scripted
        y = F.adaptive_avg_pool2d(F.hardswish(y), (4, 4))
        return torch.addmm(self.b, y.view(y.size(0), -1), self.w.t())


@pytest.mark.parametrize("fmt", ["script", "trace"])
def test_quirks_lift_exactly(fmt: str, tmp_path: Path) -> None:
    model = _Quirky().eval()
    path = save_model(model, fmt, tmp_path / "q.pt", torch.randn(1, 3, 8, 8))
    imp = import_torchscript(path, (1, 3, 8, 8))
    gm = imp.module
    kinds = {type(m) for m in gm.modules()}
    assert {nn.Conv2d, nn.BatchNorm2d, nn.Linear} <= kinds  # addmm(b, x, w.t()) became a Linear
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert relative_error(gm(x), model(x)) <= 1e-5
        assert relative_error(torch.jit.script(gm)(x), model(x)) <= 1e-5


def test_parity_error_names_the_first_bad_node(tmp_path: Path) -> None:
    path = save_model(make_model("smallcnn"), "trace", tmp_path / "m.pt", _x("smallcnn", 1))
    imp = import_torchscript(path, input_shape("smallcnn"))
    reference = copy.deepcopy(imp.module)
    with torch.no_grad():
        imp.module.get_submodule("m.features.4").weight.mul_(3)  # the second BatchNorm
    with pytest.raises(ParityError) as e:
        check_parity(imp.original, imp.module, _x("smallcnn", 2), stage="test", reference=reference)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("test:") and "m_features_4" in msg
