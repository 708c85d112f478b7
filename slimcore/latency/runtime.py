"""The runtimes a slimmed model is served with, and how one is timed: the core types the runtime plug-ins
(``torch_rt``, ``ort_rt``, ``trt_rt``) import and register.

A runtime answers two questions with the same clock: how long one small *probe* module takes (a single
conv or linear layer at a layer's real shapes, for the latency table) and how long the whole candidate
model takes (for the closed loop and the report). Both are the median over repeats after a warm-up,
with the 90th percentile beside it: on a loaded machine one slow run must not decide anything.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import SlimError
from ..registry import Registry
from ..spec import LatencySpec

# Writes the model as the runtime loads it (an ONNX file for onnxruntime and TensorRT) and returns the path.
Exporter = Callable[[nn.Module, Path], Path]


class RuntimeUnavailable(SlimError):
    """The spec names a runtime or device this worker does not have."""

    kind = "unsupported-runtime"


@dataclass(frozen=True)
class Settings:
    """A :class:`LatencySpec` with ``auto`` resolved: what every timing of one job uses."""

    runtime: str
    device: str
    batch_size: int
    threads: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p90_ms: float
    repeats: int
    min_ms: float = 0.0
    blocks: tuple[float, ...] = ()  # each alternating block's median, in order (see ``ratio``)

    @classmethod
    def of(cls, times: list[float], blocks: tuple[float, ...] = ()) -> Timing:
        times = sorted(times)
        return cls(statistics.median(times), times[min(len(times) - 1, int(0.9 * len(times)))], len(times), times[0],
                   blocks)

    def as_dict(self) -> dict[str, Any]:
        return {"median_ms": round(self.median_ms, 4), "p90_ms": round(self.p90_ms, 4), "repeats": self.repeats}


@dataclass(frozen=True)
class Budget:
    """How long to time: at least ``min_repeats`` runs, more while under ``seconds``, at most ``max_repeats``."""

    min_repeats: int = 10
    max_repeats: int = 60
    seconds: float = 0.2
    warmup: int = 3


PROBE = Budget()
MODEL = Budget(min_repeats=20, max_repeats=200, seconds=2.0, warmup=5)


class Runtime(Protocol):
    name: str
    settings: Settings

    def key(self) -> str:
        """Runtime, its version, device, threads and batch: probes measured under another key are not reused."""

    def time_probe(self, module: nn.Module, x: torch.Tensor) -> Timing:
        """One small module at a real input shape (batch included)."""

    def load(self, model: nn.Module, example: tuple[torch.Tensor, ...], export: Exporter) -> Runner:
        """The whole model at the example's shapes (batch included), loaded the way this runtime serves it."""


@dataclass
class Runner:
    """A loaded model: ``run`` does one forward pass, ``sync`` waits for it (CUDA); ``keep`` holds what the
    run needs alive (a session, a temporary folder's files, an engine)."""

    run: Callable[[], Any]
    sync: Callable[[], None] = lambda: None
    keep: Any = None


# A runtime plug-in is a factory: settings in, a ready runtime out (raising RuntimeUnavailable).
RUNTIMES: Registry[Callable[[Settings], Runtime]] = Registry("runtime")


def ratio(base: Timing, this: Timing) -> float:
    """``this`` ÷ ``base`` as the median of their per-block ratios when they were timed in the same alternating
    blocks, else of their medians. A slow phase of a shared machine (seconds long: on a 2-vCPU VM the same
    MobileNetV2 read 34 ms in one pass and 40 ms in the next) can land on one model's blocks and not the
    other's; it skews that round's ratio, which the median over rounds drops, where it moved the pooled
    medians of the whole timing."""
    if len(base.blocks) == len(this.blocks) >= 3:
        return statistics.median(t / max(b, 1e-12) for b, t in zip(base.blocks, this.blocks, strict=True))
    return this.median_ms / max(base.median_ms, 1e-12)


def clock(run: Callable[[], Any], budget: Budget, sync: Callable[[], None] = lambda: None) -> Timing:
    return clock_pair([Runner(run, sync)], budget)[0]


def clock_pair(runners: list[Runner], budget: Budget, rounds: int = 5) -> list[Timing]:
    """Time one or more loaded models in alternating blocks (A×n, B×n, A×n, ...): whatever else the machine
    does slows them alike, so their ratio holds where two separate timings drifted 25% apart on a 2-core
    worker. Blocks, not single runs: a runtime's idle thread pool spins for a while after its last run
    (onnxruntime, OpenMP), and would steal the cores from the other model's next run. Each block starts
    with discarded warm-up runs for the same reason."""
    rounds = rounds if len(runners) > 1 else 1
    times: list[list[float]] = [[] for _ in runners]
    blocks: list[list[float]] = [[] for _ in runners]
    per_block_min = max(1, budget.min_repeats // rounds)
    per_block_max = max(1, budget.max_repeats // rounds)
    for _ in range(rounds):
        for r, ts, bl in zip(runners, times, blocks, strict=True):
            for _ in range(budget.warmup):
                r.run()
            r.sync()
            t_end = time.perf_counter() + budget.seconds / rounds
            n = 0
            while n < per_block_max and (n < per_block_min or time.perf_counter() < t_end):
                t0 = time.perf_counter()
                r.run()
                r.sync()
                ts.append((time.perf_counter() - t0) * 1000)
                n += 1
            bl.append(statistics.median(ts[-n:]))
    return [Timing.of(ts, tuple(bl)) for ts, bl in zip(times, blocks, strict=True)]


def worker_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (not Linux)
        return os.cpu_count() or 1


def hardware(device: str) -> str:
    """What the numbers were measured on, for the report and the cache key."""
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {worker_cores()} cores"


def resolve(spec: LatencySpec, export_format: str) -> Settings:
    runtime = spec.runtime
    if runtime == "auto":
        runtime = "onnxruntime" if export_format == "onnx" else "torch"
    return Settings(runtime, spec.device, spec.batch_size, spec.threads or worker_cores())


def open_runtime(settings: Settings) -> Runtime:
    """The runtime, or a clear error when this worker lacks it (checked at the job's start, before training)."""
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeUnavailable(f"prune.latency asks for device 'cuda' ({settings.runtime}), and this worker has no "
                                 f"CUDA device; use device 'cpu' or send the job to a GPU worker")
    return RUNTIMES.get(settings.runtime)(settings)
