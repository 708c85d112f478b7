"""PyTorch as the serving runtime (TorchScript and .pt2 exports run on it): eager modules, the worker's
threads or the spec's, CUDA with channels_last when asked."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .runtime import PROBE, RUNTIMES, Exporter, Runner, Settings, Timing, clock


@contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class TorchRuntime:
    name = "torch"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device = torch.device(settings.device)

    def key(self) -> str:
        s = self.settings
        return f"torch {torch.__version__} {s.device} threads={s.threads} batch={s.batch_size}"

    def _sync(self) -> Callable[[], None]:
        return torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)

    def _prepare(self, module: nn.Module) -> nn.Module:
        m = module.to(self.device).float().eval()
        if self.device.type == "cuda":
            m = m.to(memory_format=torch.channels_last)
        return m

    def time_probe(self, module: nn.Module, x: torch.Tensor) -> Timing:
        m, x = self._prepare(module), x.to(self.device)
        with _threads(self.settings.threads), torch.no_grad():
            return clock(lambda: m(x), PROBE, self._sync())

    def load(self, model: nn.Module, example: tuple[torch.Tensor, ...], export: Exporter) -> Runner:
        m = self._prepare(copy.deepcopy(model).cpu())
        xs = tuple(t.to(self.device).float() if t.is_floating_point() else t.to(self.device) for t in example)
        threads = self.settings.threads

        @torch.no_grad()
        def run() -> Any:
            with _threads(threads):
                return m(*xs)
        return Runner(run, self._sync(), m)


RUNTIMES.register("torch")(TorchRuntime)
