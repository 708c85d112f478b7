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


def test_unlabeled_image_folder_is_a_distillation_dataset(tmp_path, digits_cnn):
    """Detection and segmentation users have images without classes: a zip of one folder of images is a
    valid dataset for task 'distillation' through ``slim run`` (and still refused for classification)."""
    import json
    import zipfile

    from PIL import Image

    from tests.conftest import run_slim, write_spec

    rng = np.random.default_rng(0)
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for i in range(24):
            p = tmp_path / f"img{i}.png"
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8), "L").save(p)
            z.write(p, f"frames/img{i}.png")
    model = save_model(digits_cnn, "pt2", tmp_path / "m.pt2", torch.zeros(1, 1, 8, 8))
    base = {"input_shape": [1, 1, 8, 8], "method": {"name": "l1", "strength": 3e-3},
            "sparse_training": {"epochs": 1, "batch_size": 8}, "prune": {"target": "channels", "amount": 0.3},
            "finetune": {"epochs": 1, "batch_size": 8}}
    spec = write_spec(tmp_path / "spec.json", task="distillation", **base)
    rep = tmp_path / "r.json"
    r = run_slim("run", str(model), "--spec", str(spec), "--data", str(archive), "-o", str(tmp_path / "o.pt2"),
                 "--report", str(rep))
    assert r.returncode == 0, r.stderr[-1500:]
    report = json.loads(rep.read_text())
    assert report["data"]["train"] + report["data"]["val"] == 24
    assert report["stages"]["finetuned"]["distillation_error"] is not None
    bad = write_spec(tmp_path / "c.json", task="classification", **base)
    r = run_slim("run", str(model), "--spec", str(bad), "--data", str(archive), "-o", str(tmp_path / "o2.pt2"))
    assert r.returncode == 2 and "train/" in r.stderr.strip().splitlines()[-1]
