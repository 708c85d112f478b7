"""Documented defaults hold whether a block is given or not, and the report says what ran (issue 11).

A spec with a ``finetune`` block but no ``lr`` once fine-tuned at 0.01 (the sparse phase's default) instead of
the documented 0.001. Each block's defaults are checked with and without the block, and through ``slim run``
(the report's ``spec`` is every setting as run). Knowledge distillation while fine-tuning, AdamW and label
smoothing go through ``slim run`` too.
"""

from __future__ import annotations

import json

import pytest
import torch

from slimcore.spec import DistillSpec, FinetuneSpec, parse_spec
from slimcore.train import kd_loss, make_optimizer
from tests.conftest import run_slim, write_spec

DOCUMENTED = {
    ("method", "name"): "l1", ("method", "search"): "auto", ("method", "pilot_runs"): 5,
    ("sparse_training", "epochs"): 10, ("sparse_training", "batch_size"): 64, ("sparse_training", "lr"): 0.01,
    ("sparse_training", "optimizer"): "sgd", ("prune", "target"): "channels", ("prune", "amount"): 0.5,
    ("prune", "min_channels"): 4, ("prune", "round_to"): 1, ("finetune", "epochs"): 5,
    ("finetune", "batch_size"): 64, ("finetune", "lr"): 0.001, ("finetune", "optimizer"): "sgd",
    ("finetune", "label_smoothing"): 0.0, ("finetune", "distill"): True, ("export", "format"): "same",
}


@pytest.mark.parametrize("block", sorted({b for b, _ in DOCUMENTED}))
def test_defaults_do_not_depend_on_the_block_being_there(block):
    bare, given = parse_spec({}), parse_spec({block: {}})
    assert getattr(bare, block) == getattr(given, block)
    for (b, field), want in DOCUMENTED.items():
        if b == block:
            assert getattr(getattr(given, b), field) == want, (b, field)


def test_a_finetune_block_without_lr_keeps_the_documented_lr():
    spec = parse_spec({"finetune": {"epochs": 2}})
    assert spec.finetune.lr == 0.001 and spec.finetune.epochs == 2
    assert parse_spec({"finetune": {"distill": False}}).finetune.distillation() is None
    assert parse_spec({"finetune": {"distill": {"temperature": 2}}}).finetune.distillation() == \
        DistillSpec(temperature=2, weight=1)


def test_kd_loss_is_zero_on_agreement_and_scaled_by_t_squared():
    s, t = torch.randn(8, 10), torch.randn(8, 10)
    assert float(kd_loss(s, s, 4.0)) == pytest.approx(0, abs=1e-6)
    # at a high temperature T²·KL tends to the logits' centred squared gap / (2·classes): scale-free in T
    hi, higher = float(kd_loss(s, t, 50.0)), float(kd_loss(s, t, 100.0))
    assert hi == pytest.approx(higher, rel=0.02) and hi > 0


def test_optimizers():
    p = [torch.nn.Parameter(torch.zeros(2))]
    assert isinstance(make_optimizer(p, FinetuneSpec()), torch.optim.SGD)
    opt = make_optimizer(p, FinetuneSpec(optimizer="adamw", momentum=0.8))
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["betas"] == (0.8, 0.999)


def _slim(tmp_path, digits, digits_cnn, **fields):
    from tests.zoo import save_model

    model = save_model(digits_cnn, "trace", tmp_path / "m.pt", torch.randn(1, 1, 8, 8))
    spec = write_spec(tmp_path / "spec.json", input_shape=[1, 1, 8, 8], **fields)
    rep = tmp_path / "r.json"
    r = run_slim("run", str(model), "--spec", str(spec), "--data", str(digits), "-o", str(tmp_path / "o.pt"),
                 "--report", str(rep))
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(rep.read_text())


def test_slim_run_reports_the_documented_defaults_and_distills(tmp_path, digits, digits_cnn):
    report = _slim(tmp_path, digits, digits_cnn, method={"strength": 1e-3},
                   sparse_training={"epochs": 1}, finetune={"epochs": 1})
    ran = report["spec"]
    for (b, field), want in DOCUMENTED.items():
        if (b, field) not in {("sparse_training", "epochs"), ("finetune", "epochs")}:
            assert ran[b][field] == want, (b, field)
    assert report["finetune_distillation"] == {"temperature": 4.0, "weight": 1.0}


def test_slim_run_without_distillation_with_adamw_and_label_smoothing(tmp_path, digits, digits_cnn):
    report = _slim(tmp_path, digits, digits_cnn, method={"strength": 1e-3},
                   sparse_training={"epochs": 1, "optimizer": "adamw", "lr": 1e-3},
                   finetune={"epochs": 2, "optimizer": "adamw", "lr": 1e-4, "label_smoothing": 0.1,
                             "distill": False})
    assert report["finetune_distillation"] is None
    assert report["spec"]["finetune"]["optimizer"] == "adamw"
    assert report["stages"]["finetuned"]["accuracy"] > 0.5


def test_a_teacher_worse_than_the_student_is_not_distilled(tmp_path, digits):
    """An upload trained for one epoch, sparse-trained for four: the student is better than the original
    before anything is removed, so fine-tuning toward the original would teach a worse function."""
    from tests.zoo import trained_digits_cnn

    weak = trained_digits_cnn(digits, epochs=1)
    report = _slim(tmp_path, digits, weak, method={"strength": 1e-4}, sparse_training={"epochs": 4, "lr": 0.05},
                   finetune={"epochs": 1})
    st = report["stages"]
    assert st["sparse"]["accuracy"] > st["baseline"]["accuracy"] + 0.01, st
    assert report["finetune_distillation"] is None
    assert "fine-tuned on labels only" in report["finetune_distillation_skipped"]
    assert any(w.startswith("distillation skipped") for w in report["warnings"])
    assert report["spec"]["finetune"]["distill"] is True  # what was asked stays in the spec as run
