"""Fine-tuning's distillation reads the teacher's scores from one pass over in-memory data instead of running
the teacher on every batch (slimcore.train.teacher_scores): the same training, cheaper (bench/README.md)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slimcore import train
from slimcore.data import make_loader
from slimcore.spec import DistillSpec, FinetuneSpec


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 8 * 8, 10))


def test_indexed_batches_name_their_rows():
    x, y = torch.randn(50, 3), torch.randint(0, 10, (50,))
    for batch in make_loader(x, y, 16, shuffle=True, seed=0, index=True):
        assert torch.equal(batch[0], x[batch[-1]]) and torch.equal(batch[1], y[batch[-1]])


def test_cached_scores_are_the_teachers_and_give_the_same_training(monkeypatch: pytest.MonkeyPatch):
    x, y = torch.randn(90, 1, 8, 8), torch.randint(0, 10, (90,))
    teacher = _net(0).eval()
    scores = train.teacher_scores(teacher, x, torch.device("cpu"))
    assert scores is not None and scores.shape == (90, 10)
    with torch.no_grad():
        assert torch.allclose(scores, teacher(x), atol=1e-5)
    spec, kd = FinetuneSpec(epochs=2, batch_size=16, lr=0.01), DistillSpec()
    a, b = _net(1), _net(1)
    train.fit(a, x, y, spec, task="classification", teacher=teacher, kd=kd, device=torch.device("cpu"))
    monkeypatch.setattr(train, "TEACHER_CACHE_BYTES", 0)  # too large to cache: the teacher runs per batch
    assert train.teacher_scores(teacher, x, torch.device("cpu")) is None
    train.fit(b, x, y, spec, task="classification", teacher=copy.deepcopy(teacher), kd=kd,
              device=torch.device("cpu"))
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.allclose(pa.float(), pb.float(), atol=1e-4)
    assert not torch.allclose(a[0].weight, _net(1)[0].weight)  # it trained
