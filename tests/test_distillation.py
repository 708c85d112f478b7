"""``task: distillation``: no labels needed; the student matches the original model's outputs."""

from __future__ import annotations

import numpy as np
import torch

from slimcore.pipeline import run_job
from slimcore.spec import parse_spec
from tests.zoo import save_model


def test_distillation_without_labels(tmp_path, digits, digits_cnn):
    d = np.load(digits)
    unlabelled = tmp_path / "x_only.npz"
    np.savez(unlabelled, x=d["x"])  # no y at all: a held-out split is made and recorded
    model = save_model(digits_cnn, "pt2", tmp_path / "m.pt2", torch.zeros(1, 1, 8, 8))
    spec = parse_spec({"task": "distillation", "method": {"name": "l1", "strength": 3e-3},
                       "sparse_training": {"epochs": 3, "lr": 0.02}, "prune": {"target": "channels", "amount": 0.4},
                       "finetune": {"epochs": 4, "lr": 0.01}})
    report = run_job(model, spec, unlabelled, tmp_path / "out.pt2")
    st = report["stages"]
    assert st["baseline"]["distillation_error"] < 1e-6  # the student starts as the teacher
    assert st["pruned"]["distillation_error"] > st["finetuned"]["distillation_error"]  # fine-tuning helps
    assert st["finetuned"]["accuracy"] is None
    assert report["data"]["val_source"].startswith("split")
    student = torch.export.load(str(tmp_path / "out.pt2")).module()
    with torch.no_grad():
        x = torch.from_numpy(d["x_val"])
        agree = (student(x).argmax(1) == digits_cnn(x).argmax(1)).float().mean()
    assert agree > 0.9
