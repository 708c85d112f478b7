"""Every architecture × upload format through the real pieces: import, plan 30% of channels with the global
threshold, remove them (with bias absorption), export in the same format, reload, compare.

The README's support table is this test's output. Small cases run by default; big ones are ``heavy``.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from slimcore.export import EXPORTERS, rel_error
from slimcore.formats import detect_format
from slimcore.groups import build_groups
from slimcore.lift import IMPORTERS
from slimcore.measure import count_params
from slimcore.pipeline import _load_plugins
from slimcore.prune import apply, plan
from slimcore.spec import PruneSpec
from tests.zoo import ARCHS, input_shape, make_model, save_model

HEAVY = {"vgg11_bn", "densenet121", "efficientnet_b0", "regnet_x_400mf", "shufflenet_v2_x0_5"}
FMT_IN = {"script": "torchscript", "trace": "torchscript", "pt2": "pt2"}
CASES = [pytest.param(a, f, marks=[pytest.mark.heavy] if a in HEAVY else [])
         for a in ["smallcnn", *ARCHS] for f in ("script", "trace", "pt2")]


@pytest.mark.parametrize("arch, fmt", CASES)
def test_import_prune_export_reload(tmp_path, arch, fmt):
    torch.manual_seed(0)
    _load_plugins()
    shape = input_shape(arch)
    x = torch.randn((2, *shape[1:]))
    original = make_model(arch)
    path = save_model(original, fmt, tmp_path / f"m.{fmt}", x[:1])
    detected = detect_format(path)  # as `slim run` and the worker do: by content, never by name
    # Known today: TorchScript whose code paths hold '/models/' (torchvision/models/*.py) is taken for a .pt2.
    # The rest of the case still runs on the right importer (its assertions keep guarding); the case then ends
    # as xfail naming the misdetection, and passes once the format-detection fix lands.
    misread = detected != FMT_IN[fmt] and FMT_IN[fmt] == "torchscript"
    assert misread or detected == FMT_IN[fmt]
    imported = IMPORTERS.get(FMT_IN[fmt] if misread else detected)(path, shape)
    model = imported.module
    x5 = torch.randn((5, *shape[1:]))
    with torch.no_grad():
        assert rel_error(model(x), original(x)) <= 1e-5
        assert rel_error(model(x5), original(x5)) <= 1e-5  # the batch is not baked in
    bn = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)
    assert sum(isinstance(m, bn) for m in model.modules()) == sum(isinstance(m, bn) for m in original.modules())
    gs = build_groups(model, x, [], imported.meta.get("unprunable"))
    p = plan(model, gs, PruneSpec(target="channels", amount=0.3, min_channels=1), "max", x)
    total = float(sum(float(g.weight.sum()) for g in gs.groups))  # channels (a grouped conv's group counts whole)
    step = max(float(g.weight.max()) for g in gs.groups)
    assert abs(p.achieved - 0.3) <= step / total + 1e-9  # the asked fraction, to a channel (or one group)
    p0 = count_params(model)
    apply(model, gs, p.remove, calib=[x])
    assert count_params(model) < p0
    model.eval()
    out = tmp_path / f"out.{fmt}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        EXPORTERS.get(imported.fmt)(model, imported, out, x)  # reloads and checks ≤ 1e-4 itself
        reloaded = torch.jit.load(str(out)) if imported.fmt == "torchscript" else torch.export.load(str(out)).module()
    with torch.no_grad():
        assert rel_error(reloaded(x5), model(x5)) <= 1e-4
    if misread:
        pytest.xfail(f"detect_format reads this TorchScript as {detected} (a '/models/' code path, e.g. "
                     "torchvision/models/*.py, taken for a .pt2 member); the format-detection fix removes this")
