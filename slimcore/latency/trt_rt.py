"""TensorRT as the serving runtime (GPU workers only): the probe or the candidate goes through ONNX into
an engine built for the exact input shapes (FP32 unless the GPU path asks otherwise), timed with CUDA
events around ``execute_async_v3`` on torch-owned buffers. Written against TensorRT 10's Python API;
this machine has no GPU, so it is exercised only where one is lent (bench/README.md says which figures)."""

from __future__ import annotations

import io as _io
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .runtime import PROBE, RUNTIMES, Exporter, Runner, RuntimeUnavailable, Settings, Timing, clock


class TensorRTRuntime:
    name = "tensorrt"

    def __init__(self, settings: Settings) -> None:
        if settings.device != "cuda" or not torch.cuda.is_available():
            raise RuntimeUnavailable("TensorRT needs a CUDA device, and this worker has none; use runtime "
                                     "'onnxruntime' or 'torch' on device 'cpu'")
        try:
            import tensorrt as trt
        except ImportError:
            raise RuntimeUnavailable("TensorRT is not installed on this worker (pip install tensorrt); use runtime "
                                     "'onnxruntime' or 'torch'") from None
        self.trt = trt
        self.settings = settings
        self.logger = trt.Logger(trt.Logger.ERROR)

    def key(self) -> str:
        s = self.settings
        return f"tensorrt {self.trt.__version__} cuda threads={s.threads} batch={s.batch_size}"

    def _engine(self, onnx_bytes: bytes) -> Any:
        trt = self.trt
        builder = trt.Builder(self.logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse(onnx_bytes):
            errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeUnavailable(f"TensorRT could not parse the model: {errs}")
        config = builder.create_builder_config()
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeUnavailable("TensorRT could not build an engine for this model")
        return trt.Runtime(self.logger).deserialize_cuda_engine(serialized)

    def _runner(self, onnx_bytes: bytes, xs: tuple[torch.Tensor, ...]) -> Runner:
        trt = self.trt
        engine = self._engine(onnx_bytes)
        ctx = engine.create_execution_context()
        stream = torch.cuda.Stream()
        inputs = iter(x.to("cuda").float().contiguous() for x in xs)
        keep = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                t = next(inputs)
                ctx.set_input_shape(name, tuple(t.shape))
            else:
                t = torch.empty(tuple(ctx.get_tensor_shape(name)), device="cuda", dtype=torch.float32)
            keep.append(t)
            ctx.set_tensor_address(name, t.data_ptr())
        return Runner(lambda: ctx.execute_async_v3(stream.cuda_stream), stream.synchronize, (engine, ctx, keep))

    def time_probe(self, module: nn.Module, x: torch.Tensor) -> Timing:
        buf = _io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module.eval().cpu(), (x.cpu(),), buf, dynamo=False, input_names=["x"])
        r = self._runner(buf.getvalue(), (x,))
        return clock(r.run, PROBE, r.sync)

    def load(self, model: nn.Module, example: tuple[torch.Tensor, ...], export: Exporter) -> Runner:
        with tempfile.TemporaryDirectory(prefix="slim-trt-") as d:
            return self._runner(export(model, Path(d) / "candidate.onnx").read_bytes(), example)


RUNTIMES.register("tensorrt")(TensorRTRuntime)
