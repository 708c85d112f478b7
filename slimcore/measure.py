"""Size and speed of a model: parameters, FLOPs (``torch.utils.flop_counter``) and CPU latency."""

from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from . import io


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, x: io.Inputs) -> int:
    """FLOPs of one forward pass at the given input(s) (batch 1 by convention in reports)."""
    was = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as fc:
            io.call(model, x)
    finally:
        model.train(was)
    return int(fc.get_total_flops())


@torch.no_grad()
def cpu_latency_ms(model: nn.Module, x: io.Inputs, *, repeat: int = 20, warmup: int = 3) -> float:
    """Median wall time of a batch-1 forward on CPU, in milliseconds.

    A copy is moved to CPU so the training device and the caller's model are untouched.
    """
    m = copy.deepcopy(model).cpu().float().eval()
    x = io.apply(io.rows(x, slice(0, 1)), lambda t: t.detach().cpu().float())
    for _ in range(warmup):
        io.call(m, x)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        io.call(m, x)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)
