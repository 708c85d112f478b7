"""Training loops for sparse training and fine-tuning.

SGD with momentum and a cosine or step schedule (stepped per iteration so short jobs still anneal).
``classification`` uses cross-entropy against labels on the model's one ``(batch, classes)`` output;
``distillation`` needs no labels and matches every output of the original model (:func:`distill_loss`).
Inputs and outputs go through :mod:`slimcore.io`, so several inputs and tuple/list/dict outputs train alike.
On CUDA: bf16 autocast (no loss scaling needed, so the sparsity penalty is applied to true gradients),
channels_last for 4-d inputs, pinned-memory loaders.
The method hooks run after backward and after the optimizer step, never inside autograd.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import io
from .data import make_loader
from .errors import SlimError
from .methods import Method
from .spec import DistillSpec, TrainSpec

Progress = Callable[[dict[str, float]], None]


@dataclass
class Evaluation:
    loss: float
    accuracy: float | None  # classification
    distill_error: float | None  # distillation: mean squared output error relative to the teacher's
    # distillation: that error per output (``io.names`` or the format's output names), same weighting
    per_output: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float | None | dict[str, float]]:
        d: dict[str, float | None | dict[str, float]] = {
            "loss": self.loss, "accuracy": self.accuracy, "distillation_error": self.distill_error}
        if self.per_output:
            d["distillation_error_per_output"] = self.per_output
        return d


def logits(out: object) -> torch.Tensor:
    """The ``(batch, classes)`` output classification trains on: the only output, or the only 2-d one among
    several (``io.classifier_output``); anything else is a SlimError naming the outputs."""
    index, why = io.classifier_output(out)
    if index is None:
        raise SlimError(why)
    return io.leaves(out)[index]


FLOOR = 1e-8


def distill_loss(out: object, ref: object) -> torch.Tensor:
    """Match every output of the teacher: ``Σ_k w_k · MSE_k``.

    ``w_k = (n_k / N) / p_k``: ``n_k`` is output k's element count (N their sum), ``p_k`` the teacher's mean
    square of output k on this batch. With one output this is the plain MSE; with several, each output's
    *relative* error counts by its size whatever its scale, and the loss itself is scale-free: YOLO's
    decoded boxes (mean square ≈ 9e3, pixels) made an absolute-scale loss diverge at every learning rate
    tried down to 1e-4. ``p_k`` is floored at ``FLOOR · P`` (P the mean square over all outputs): an output
    that is all but silent (a random-weight YOLO's raw feature maps, mean square 1e-19) would otherwise get
    a weight that blows the gradients up.
    """
    outs, refs = io.leaves(out), io.leaves(ref)
    if len(outs) != len(refs):
        raise SlimError(f"the model gives {len(outs)} outputs but the original {len(refs)}")
    if len(outs) == 1:
        return F.mse_loss(outs[0].float(), refs[0].float())
    sizes = [r.numel() for r in refs]
    total = float(sum(sizes))
    powers = [r.detach().float().pow(2).mean() for r in refs]
    pooled = sum(p * (n / total) for p, n in zip(powers, sizes, strict=True))
    loss = outs[0].new_zeros((), dtype=torch.float32)
    for o, r, p, n in zip(outs, refs, powers, sizes, strict=True):
        denom = torch.maximum(p, pooled * FLOOR)  # a near-silent output (1e-19) must not get a 1e21 weight
        scale = torch.where(denom > 1e-12, 1 / denom.clamp_min(1e-12), torch.ones_like(p))
        loss = loss + (n / total) * scale * F.mse_loss(o.float(), r.float())
    return loss


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), batch-mean (Hinton et al.'s soft-target term)."""
    t = float(temperature)
    return F.kl_div(F.log_softmax(student.float() / t, 1), F.log_softmax(teacher.float() / t, 1),
                    reduction="batchmean", log_target=True) * (t * t)


def make_optimizer(params: object, spec: TrainSpec) -> torch.optim.Optimizer:
    """SGD with momentum (the papers') or AdamW with ``momentum`` as β1. A method's parameter-group overrides
    are SGD's (ISTA sets momentum 0 on γ): AdamW ignores the momentum key, so its moments apply to γ too."""
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=spec.lr, betas=(spec.momentum, 0.999), weight_decay=spec.weight_decay)
    return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)


def device_of(prefer: str | None = None) -> torch.device:
    if prefer:
        return torch.device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _prep(model: nn.Module, device: torch.device, x_rank: int) -> nn.Module:
    model.to(device)
    if device.type == "cuda" and x_rank == 4:
        model.to(memory_format=torch.channels_last)
    return model


def _batch_to(x: io.Inputs, device: torch.device) -> io.Inputs:
    def one(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device, non_blocking=True)
        if device.type == "cuda" and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        return t

    return io.apply(x, one)


def _rank(x: io.Inputs) -> int:
    return io.rank(x)


def _lr_at(spec: TrainSpec, it: int, total: int) -> float:
    if spec.schedule == "constant" or total <= 1:
        return spec.lr
    frac = it / total
    if spec.schedule == "cosine":
        return spec.lr * 0.5 * (1 + math.cos(math.pi * frac))
    return spec.lr * (0.1 ** (int(frac >= 0.5) + int(frac >= 0.75)))  # network slimming's ÷10 at 50%, 75%


TEACHER_CACHE_BYTES = 256 * 2**20


@torch.no_grad()
def teacher_scores(teacher: nn.Module, x: io.Inputs, device: torch.device) -> torch.Tensor | None:
    """The teacher's scores for every training row, computed once, or None where they cannot be reused.

    Why: distillation ran the teacher (the original, unpruned model) on every fine-tuning batch; on the
    digits CNN that was 0.6 s of a 1.0 s fine-tuning, since the teacher is the larger of the two models.
    The teacher is in eval mode and in-memory rows are the same every epoch, so one pass serves all
    epochs. Not for lazy data (augmented, or too large to hold: each epoch sees new crops) nor when the
    scores would exceed ``TEACHER_CACHE_BYTES`` (rows × classes × 4 bytes) on the device."""
    if isinstance(x, io.LazyInputs):
        return None
    n, parts, amp = io.num_rows(x), [], device.type == "cuda"
    for xb in io.batches(x, 256):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            part = logits(io.call(teacher, _batch_to(xb, device))).float()
        if part.dim() != 2 or n * part.shape[1] * 4 > TEACHER_CACHE_BYTES:
            return None
        parts.append(part)
    return torch.cat(parts) if parts else None


def fit(model: nn.Module, x: io.Inputs, y: torch.Tensor | None, spec: TrainSpec, *, task: str,
        teacher: nn.Module | None = None, method: Method | None = None, device: torch.device | None = None,
        seed: int = 0, progress: Progress | None = None, should_stop: Callable[[], bool] | None = None,
        start_epoch: int = 0, opt_state: dict | None = None,
        on_epoch_end: Callable[[int, dict], None] | None = None,
        stop_early: Callable[[int], bool] | None = None, kd: DistillSpec | None = None) -> bool:
    """Train ``model`` in place for ``spec.epochs`` epochs; False if ``should_stop`` cut it short.

    A resumed job passes ``start_epoch`` and the optimizer state saved by ``on_epoch_end(epochs_done,
    optimizer_state)``; the learning-rate schedule is a function of the iteration, so it resumes exactly.
    ``kd`` with a ``teacher`` adds :func:`kd_loss` to classification's cross-entropy (``kd.weight`` times).
    """
    if spec.epochs == 0 or start_epoch >= spec.epochs:
        return True
    device = device or device_of()
    _prep(model, device, _rank(x))
    if teacher is not None:
        _prep(teacher, device, _rank(x)).eval()
    soft = kd if kd is not None and kd.weight > 0 and teacher is not None and task == "classification" else None
    cached = teacher_scores(teacher, x, device) if soft is not None else None
    loader = make_loader(x, y if task == "classification" else None, spec.batch_size, shuffle=True,
                         seed=seed, pin_memory=device.type == "cuda", index=cached is not None)
    steps = max(1, len(loader))
    total = spec.epochs * steps
    # A method may put γ in its own parameter group (ISTA: no momentum, no weight decay on γ).
    params = method.param_groups(model) if method is not None else model.parameters()
    opt = make_optimizer(params, spec)
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
                out = io.call(model, xb)
                if task == "classification":
                    scores = logits(out).float()
                    loss = F.cross_entropy(scores, batch[1].to(device, non_blocking=True),
                                           label_smoothing=spec.label_smoothing)
                    if cached is not None:
                        ref_scores = cached[batch[-1].to(device, non_blocking=True)]
                    elif soft is not None:
                        with torch.no_grad():
                            ref_scores = logits(io.call(teacher, xb))
                    if soft is not None:
                        loss = loss + soft.weight * kd_loss(scores, ref_scores, soft.temperature)
                else:
                    with torch.no_grad():
                        ref = io.call(teacher, xb)
                    loss = distill_loss(out, ref)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if method is not None:
                method.after_backward()
            opt.step()
            if method is not None:
                method.after_step(lr)
            running += loss.detach() * io.num_rows(xb)
            seen += io.num_rows(xb)
            if progress is not None and time.monotonic() - last_report > 5:
                last_report = time.monotonic()
                progress({"epoch": epoch + (step + 1) / steps, "loss": float(running / max(seen, 1)), "lr": lr})
        if not bool(torch.isfinite(running)):  # one host sync per epoch; never checkpoint a diverged state
            from .errors import SlimError

            raise SlimError(f"training diverged: the loss became {float(running)} in epoch {epoch + 1} at lr {lr:.3g}; "
                            "lower sparse_training.lr / finetune.lr or method.strength (a model whose outputs are "
                            "far from trained, e.g. random weights, can need a much smaller lr)")
        if progress is not None:
            progress({"epoch": epoch + 1.0, "loss": float(running / max(seen, 1)), "lr": lr})
            last_report = time.monotonic()
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, opt.state_dict())
        if stop_early is not None and stop_early(epoch + 1):
            break
    return True


@torch.no_grad()
def evaluate(model: nn.Module, x: io.Inputs, y: torch.Tensor | None, *, task: str,
             teacher: nn.Module | None = None, device: torch.device | None = None,
             batch_size: int = 256, output_names: Sequence[str] | None = None) -> Evaluation:
    """Accuracy (classification) and, given a teacher, the distillation error: per output k the squared
    error relative to the teacher's output power, ``e_k = Σ(out−ref)² / Σref²``, and overall their mean
    weighted by element count (``Σ_k (n_k/N)·e_k``, the weighting :func:`distill_loss` trains with)."""
    device = device or device_of()
    was = model.training
    _prep(model, device, _rank(x)).eval()
    if teacher is not None:
        _prep(teacher, device, _rank(x)).eval()
    loss_sum, correct, n = 0.0, 0, 0
    err: list[float] = []
    ref_pow: list[float] = []
    sizes: list[int] = []
    names: list[str] = []
    amp = device.type == "cuda"
    for xb in io.batches(x, batch_size):
        i = n
        xb = _batch_to(xb, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = io.apply(io.call(model, xb), lambda t: t.float())
        if task == "classification" and y is not None:
            yb = y[i:i + batch_size].to(device)
            scores = logits(out)
            loss_sum += float(F.cross_entropy(scores, yb, reduction="sum"))
            correct += int((scores.argmax(1) == yb).sum())
        if teacher is not None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                ref = io.apply(io.call(teacher, xb), lambda t: t.float())
            named = io.named_leaves(ref, output_names)
            if not names:
                names, err, ref_pow, sizes = [k for k, _ in named], [0.0] * len(named), [0.0] * len(named), \
                    [t[0].numel() for _, t in named]
            for k, (o, (_, r)) in enumerate(zip(io.leaves(out), named, strict=True)):
                err[k] += float(((o - r) ** 2).sum())
                ref_pow[k] += float((r**2).sum())
        n += io.num_rows(xb)
    model.train(was)
    per = {k: (e / p if p else 0.0) for k, e, p in zip(names, err, ref_pow, strict=True)}
    rel = sum(per[k] * s for k, s in zip(names, sizes, strict=True)) / sum(sizes) if sizes else 0.0
    if task == "classification" and y is not None:
        return Evaluation(loss_sum / n, correct / n, rel if teacher is not None and any(ref_pow) else None,
                          per if teacher is not None else {})
    return Evaluation(rel, None, rel, per)
