"""onnxruntime as the serving runtime: probes are exported to ONNX in memory, candidates through the
job's own ONNX exporter (the file the user gets), each run in an ``InferenceSession`` with the spec's
threads. onnxruntime's NCHWc kernels are what make channel counts that are not multiples of 4/8 slow."""

from __future__ import annotations

import io as _io
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .runtime import PROBE, RUNTIMES, Exporter, Runner, RuntimeUnavailable, Settings, Timing, clock


class OrtRuntime:
    name = "onnxruntime"

    def __init__(self, settings: Settings) -> None:
        import onnxruntime as ort

        self.ort = ort
        self.settings = settings
        want = "CUDAExecutionProvider" if settings.device == "cuda" else "CPUExecutionProvider"
        if want not in ort.get_available_providers():
            raise RuntimeUnavailable(f"onnxruntime on this worker has no {want} (it has "
                                     f"{', '.join(ort.get_available_providers())}); use device 'cpu'")
        self.providers = [want]

    def key(self) -> str:
        s = self.settings
        return f"onnxruntime {self.ort.__version__} {s.device} threads={s.threads} batch={s.batch_size}"

    def _session(self, model: bytes | str) -> Any:
        opts = self.ort.SessionOptions()
        opts.intra_op_num_threads = self.settings.threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        return self.ort.InferenceSession(model, opts, providers=self.providers)

    def time_probe(self, module: nn.Module, x: torch.Tensor) -> Timing:
        buf = _io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module.eval(), (x,), buf, dynamo=False, input_names=["x"])
        sess, xn = self._session(buf.getvalue()), x.numpy()
        return clock(lambda: sess.run(None, {"x": xn}), PROBE)

    def load(self, model: nn.Module, example: tuple[torch.Tensor, ...], export: Exporter) -> Runner:
        folder = tempfile.TemporaryDirectory(prefix="slim-ort-")
        sess = self._session(str(export(model, Path(folder.name) / "candidate.onnx")))
        feed = {i.name: t.detach().cpu().numpy() for i, t in zip(sess.get_inputs(), example, strict=True)}
        return Runner(lambda: sess.run(None, feed), keep=(sess, folder))


RUNTIMES.register("onnxruntime")(OrtRuntime)
