"""Latency as a pruning target: runtimes that time models (torch, onnxruntime, TensorRT), the measured
per-layer latency table, and the closed-loop planner. onnxruntime and TensorRT load on first use."""

from . import torch_rt  # noqa: F401  (registers "torch")
from .runtime import RUNTIMES

RUNTIMES.lazy("onnxruntime", "slimcore.latency.ort_rt")
RUNTIMES.lazy("tensorrt", "slimcore.latency.trt_rt")
