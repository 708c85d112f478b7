"""Training loops for sparse training and fine-tuning.

SGD with momentum and a cosine or step schedule (stepped per iteration so short jobs still anneal).
``classification`` uses cross-entropy against labels; ``distillation`` needs no labels and matches the
original model's outputs (MSE on logits). On CUDA: bf16 autocast (no loss scaling needed, so the
sparsity penalty is applied to true gradients), channels_last for 4-d inputs, pinned-memory loaders.
The method hooks run after backward and after the optimizer step, never inside autograd.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .data import make_loader
from .methods import Method
from .spec import TrainSpec

Progress = Callable[[dict[str, float]], None]


@dataclass
class Evaluation:
    loss: float
    accuracy: float | None  # classification
    distill_error: float | None  # distillation: mean squared output error relative to the teacher's

    def as_dict(self) -> dict[str, float | None]:
        return {"loss": self.loss, "accuracy": self.accuracy, "distillation_error": self.distill_error}


def device_of(prefer: str | None = None) -> torch.device:
    if prefer:
        return torch.device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _prep(model: nn.Module, device: torch.device, x_rank: int) -> nn.Module:
    model.to(device)
    if device.type == "cuda" and x_rank == 4:
        model.to(memory_format=torch.channels_last)
    return model


def _batch_to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if device.type == "cuda" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _lr_at(spec: TrainSpec, it: int, total: int) -> float:
    if spec.schedule == "constant" or total <= 1:
        return spec.lr
    frac = it / total
    if spec.schedule == "cosine":
        return spec.lr * 0.5 * (1 + math.cos(math.pi * frac))
    return spec.lr * (0.1 ** (int(frac >= 0.5) + int(frac >= 0.75)))  # network slimming's ÷10 at 50%, 75%


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, spec: TrainSpec, *, task: str,
        teacher: nn.Module | None = None, method: Method | None = None, device: torch.device | None = None,
        seed: int = 0, progress: Progress | None = None, should_stop: Callable[[], bool] | None = None,
        start_epoch: int = 0, opt_state: dict | None = None,
        on_epoch_end: Callable[[int, dict], None] | None = None,
        stop_early: Callable[[int], bool] | None = None) -> bool:
    """Train ``model`` in place for ``spec.epochs`` epochs; False if ``should_stop`` cut it short.

    A resumed job passes ``start_epoch`` and the optimizer state saved by ``on_epoch_end(epochs_done,
    optimizer_state)``; the learning-rate schedule is a function of the iteration, so it resumes exactly.
    """
    if spec.epochs == 0 or start_epoch >= spec.epochs:
        return True
    device = device or device_of()
    _prep(model, device, x.dim())
    if teacher is not None:
        _prep(teacher, device, x.dim()).eval()
    loader = make_loader(x, y if task == "classification" else None, spec.batch_size, shuffle=True,
                         seed=seed, pin_memory=device.type == "cuda")
    steps = max(1, len(loader))
    total = spec.epochs * steps
    # A method may put γ in its own parameter group (ISTA: no momentum, no weight decay on γ).
    params = method.param_groups(model) if method is not None else model.parameters()
    opt = torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    amp = device.type == "cuda"
    last_report = time.monotonic()
    for epoch in range(start_epoch, spec.epochs):
        model.train()
        running, seen = torch.zeros((), device=device), 0
        for step, batch in enumerate(loader):
            if should_stop is not None and should_stop():
                return False
            it = epoch * steps + step
            lr = _lr_at(spec, it, total)
            for gr in opt.param_groups:
                gr["lr"] = lr
            xb = _batch_to(batch[0], device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = model(xb)
                if task == "classification":
                    loss = F.cross_entropy(out.float(), batch[1].to(device, non_blocking=True))
                else:
                    with torch.no_grad():
                        ref = teacher(xb)  # type: ignore[misc]
                    loss = F.mse_loss(out.float(), ref.float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if method is not None:
                method.after_backward()
            opt.step()
            if method is not None:
                method.after_step(lr)
            running += loss.detach() * xb.shape[0]
            seen += xb.shape[0]
            if progress is not None and time.monotonic() - last_report > 5:
                last_report = time.monotonic()
                progress({"epoch": epoch + (step + 1) / steps, "loss": float(running / max(seen, 1)), "lr": lr})
        if progress is not None:
            progress({"epoch": epoch + 1.0, "loss": float(running / max(seen, 1)), "lr": lr})
            last_report = time.monotonic()
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, opt.state_dict())
        if stop_early is not None and stop_early(epoch + 1):
            break
    return True


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, *, task: str,
             teacher: nn.Module | None = None, device: torch.device | None = None,
             batch_size: int = 256) -> Evaluation:
    device = device or device_of()
    was = model.training
    _prep(model, device, x.dim()).eval()
    if teacher is not None:
        _prep(teacher, device, x.dim()).eval()
    loss_sum, correct, n, err, ref_pow = 0.0, 0, 0, 0.0, 0.0
    amp = device.type == "cuda"
    for i in range(0, x.shape[0], batch_size):
        xb = _batch_to(x[i:i + batch_size], device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(xb).float()
        if task == "classification" and y is not None:
            yb = y[i:i + batch_size].to(device)
            loss_sum += float(F.cross_entropy(out, yb, reduction="sum"))
            correct += int((out.argmax(1) == yb).sum())
        if teacher is not None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                ref = teacher(xb).float()
            err += float(((out - ref) ** 2).sum())
            ref_pow += float((ref**2).sum())
        n += xb.shape[0]
    model.train(was)
    if task == "classification" and y is not None:
        return Evaluation(loss_sum / n, correct / n, err / ref_pow if teacher is not None and ref_pow else None)
    rel = err / ref_pow if ref_pow else 0.0
    return Evaluation(rel, None, rel)
