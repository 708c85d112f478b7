"""The latency loop's glue, as a plug-in of two stages placed by anchors (nothing else names them):

- ``latency``, after ``calibrate``: opens the target runtime when the spec measures latency (a runtime the
  worker lacks fails the job here, before any training), and adds the runtime's timing to the ``baseline``,
  ``pruned`` and ``finetuned`` report stages through :attr:`JobState.measures`. The prune stage's planner
  reads :attr:`JobState.latency`. Its outputs are what has been measured so far (stage timings, the closed
  loop's tries, the table's summary), read at each checkpoint; on resume the runtime is opened again and they
  are put back, so a resumed job neither re-times the original nor loses the planner's record.
- ``latency_check``, after ``finetuning``: a slimmed model not faster than the original on the runtime fails a
  latency target and is a warning for any other.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import io
from ..export import EXPORTERS
from ..latency.job import LatencyJob, check_faster
from ..lift import Imported
from .state import STAGES, JobState, Resume, Stage


def onnx_writer(imported: Imported, example: io.Inputs) -> Callable[[torch.nn.Module, Path], Path]:
    """How a candidate reaches onnxruntime or TensorRT: the job's own ONNX exporter, on a copy."""
    def write(model: torch.nn.Module, dest: Path) -> Path:
        EXPORTERS.get("onnx")(copy.deepcopy(model).cpu(), imported, dest, example)
        return dest
    return write


@STAGES.register("latency", after="calibrate")
class OpenRuntime(Stage):
    def run(self, job: JobState, resume: Resume | None) -> None:
        imported = job.imported
        lat = LatencyJob.open(job.spec.prune, job.out_fmt, onnx_writer(imported, job.example), job.example,
                              None if imported.dynamic_batch else imported.input_shape[0])
        job.latency = lat
        if lat is None:
            return
        lat.reference = job.reference
        job.measures.append(lambda name, model: {"runtime_latency": lat.stage(name, model).as_dict()})

    def outputs(self, job: JobState) -> dict[str, Any] | None:
        return None if job.latency is None else {"measured": job.latency.state()}

    def restore(self, job: JobState, outputs: dict[str, Any]) -> None:
        self.run(job, None)
        if job.latency is not None:
            job.latency.restore(outputs["measured"])


@STAGES.register("latency_check", after="finetuning")
class CheckFaster(Stage):
    def run(self, job: JobState, resume: Resume | None) -> None:
        if job.latency is not None:
            not_faster = check_faster(job.latency, strict=job.plan.target == "latency")
            if not_faster:
                job.rb.warn(not_faster)
