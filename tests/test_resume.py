"""A job interrupted during sparse training or fine-tuning resumes from its per-epoch checkpoint."""

from __future__ import annotations

import pytest
import torch

from slimcore.checkpoint import FileCheckpoints
from slimcore.errors import JobCanceled
from slimcore.pipeline import run_job
from slimcore.spec import parse_spec
from tests.zoo import save_model

SPEC = {"input_shape": [1, 1, 8, 8], "method": {"name": "l1", "strength": 3e-3},
        "sparse_training": {"epochs": 3, "lr": 0.02}, "prune": {"target": "channels", "amount": 0.4},
        "finetune": {"epochs": 3, "lr": 0.01}}


@pytest.mark.parametrize("stop_in", ["sparse_training", "finetuning"])
def test_resume_after_interruption(tmp_path, digits, digits_cnn, stop_in):
    model = save_model(digits_cnn, "pt2", tmp_path / "m.pt2", torch.zeros(1, 1, 8, 8))
    spec = parse_spec(SPEC)
    store = FileCheckpoints(tmp_path / "ckpt")
    seen: list[tuple[str, float]] = []

    def progress(phase: str, frac: float, metrics: dict) -> None:
        seen.append((phase, metrics.get("epoch", 0.0)))

    def stop() -> bool:  # the "worker dies" moment: after the first full epoch of the chosen phase
        return any(ph == stop_in and ep >= 1.0 for ph, ep in seen)

    with pytest.raises(JobCanceled):
        run_job(model, spec, digits, tmp_path / "out.pt2", progress=progress, should_stop=stop, checkpoints=store)
    state = store.load()
    assert state is not None and state["phase"] == stop_in and state["epoch"] == 1
    resumed: list[tuple[str, float]] = []
    report = run_job(model, spec, digits, tmp_path / "out.pt2", checkpoints=store,
                     progress=lambda ph, fr, m: resumed.append((ph, m.get("epoch", 0.0))))
    assert report["resumed_from"] == f"{stop_in}:1"
    # a resumed job times only what it ran again: the stages before the interrupted one were restored
    assert "import" in report["stage_seconds"] and "baseline" not in report["stage_seconds"]
    # the resumed run trains only the remaining epochs of the interrupted phase
    assert [e for ph, e in resumed if ph == stop_in and e in (1.0, 2.0, 3.0)] == [2.0, 3.0]
    assert report["stages"]["finetuned"]["params"] < report["stages"]["baseline"]["params"]
    assert report["stages"]["finetuned"]["accuracy"] > 0.9
    reloaded = torch.export.load(str(tmp_path / "out.pt2")).module()
    assert reloaded(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
