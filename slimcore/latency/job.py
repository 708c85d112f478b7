"""One job's view of its target runtime: opened at the job's start (so a runtime the worker lacks fails
before any training), timing each stage, holding the latency table and writing the report's section.

Only jobs whose spec measures latency (``prune.target: "latency"`` or ``round_to: "auto"``) open one;
every other job keeps today's torch CPU ``latency_ms`` per stage and pays nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from .. import io
from ..errors import SlimError
from ..groups import GroupSet, public_name
from ..spec import PruneSpec
from .runtime import (
    MODEL,
    Exporter,
    Runner,
    Runtime,
    Settings,
    Timing,
    clock_pair,
    hardware,
    open_runtime,
    ratio,
    resolve,
)
from .table import LatencyTable

_TABLE = ("table", "steps", "layers")  # the report's section that the latency table writes


class LatencyJob:
    def __init__(self, settings: Settings, runtime: Runtime, export: Exporter, example: io.Inputs) -> None:
        self.settings = settings
        self.runtime = runtime
        self.export = export
        one = io.rows(example, slice(0, 1))
        # the timing input: the first sample repeated to the spec's batch
        self.inputs = io.args(io.apply(one, lambda t: t.expand(settings.batch_size, *t.shape[1:]).contiguous()))
        self.example = example
        self.stages: dict[str, dict[str, Any]] = {}
        self.iterations: list[dict[str, Any]] = []
        self.target: dict[str, Any] | None = None
        self._table: LatencyTable | None = None
        self._base: Runner | None = None
        self.alignment: dict[str, Any] | None = None  # the whole-model alignment check (planner.alignment_floor)
        self.reference: nn.Module | None = None  # the original model, for timings after a resume
        self._table_summary: dict[str, Any] = {}  # a resumed job's table section (the table is not rebuilt)

    @classmethod
    def open(cls, spec: PruneSpec, export_format: str, export: Exporter, example: io.Inputs,
             fixed_batch: int | None = None) -> LatencyJob | None:
        """None unless the spec measures latency; raises a one-line SlimError for a runtime the worker lacks."""
        if not spec.measures_latency():
            return None
        settings = resolve(spec.latency, export_format)
        if fixed_batch is not None and settings.batch_size != fixed_batch:
            raise SlimError(f"the model's batch size is fixed at {fixed_batch} in the file, so it cannot be timed at "
                            f"prune.latency.batch_size {settings.batch_size}; set it to {fixed_batch}")
        return cls(settings, open_runtime(settings), export, example)

    def load(self, model: nn.Module) -> Runner:
        was = model.training
        try:
            return self.runtime.load(model.eval(), self.inputs, self.export)
        finally:
            model.train(was)

    def baseline(self) -> Runner:
        """The original model, loaded once and kept: every later timing runs interleaved with it."""
        if self._base is None:
            if self.reference is None:
                raise RuntimeError("LatencyJob.reference (the original model) is not set")
            self._base = self.load(self.reference)
        return self._base

    def compare(self, model: nn.Module | Runner) -> tuple[Timing, Timing]:
        """(original, this) timed interleaved; their ratio is what targets and checks use."""
        run = model if isinstance(model, Runner) else self.load(model)
        base, this = clock_pair([self.baseline(), run], MODEL)
        return base, this

    def stage(self, name: str, model: nn.Module) -> Timing:
        if name == "baseline":
            self._base = self.load(model)
            t = clock_pair([self._base], MODEL)[0]
            self.stages[name] = t.as_dict()
            return t
        base, t = self.compare(model)
        self.stages[name] = {**t.as_dict(), "ratio_to_baseline": round(ratio(base, t), 4)}
        return t

    def table(self, model: nn.Module, gs: GroupSet) -> LatencyTable:
        if self._table is None:
            self._table = LatencyTable(model, gs, self.example, self.runtime)
        return self._table

    def rounder(self, model: nn.Module, gs: GroupSet) -> Callable[[int], int]:
        """Per group, the kept-count multiple this runtime is measured to be fast at (``round_to: "auto"``)."""
        table = self.table(model, gs)
        table.probe_all(curves=False)
        return table.group_step

    def report(self) -> dict[str, Any]:
        t = self._table
        out: dict[str, Any] = {**self.settings.as_dict(), "runtime_version": self.runtime.key(),
                               "hardware": hardware(self.settings.device), "stages": self.stages,
                               "target": self.target, "iterations": self.iterations, "alignment": self.alignment}
        if t is not None:
            out["table"] = t.stats()
            out["steps"] = {f"{public_name(s.name)}:{d}": step for s in t.sites.values() for d, step in s.steps.items()}
            out["layers"] = t.slowest()
        else:
            out.update(self._table_summary)
        return out

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps: the measurements so far (the runtime is opened again on resume)."""
        out = self.report()
        return {k: out[k] for k in ("stages", "target", "iterations", "alignment", *_TABLE) if k in out}

    def restore(self, state: dict[str, Any] | None) -> None:
        """A resumed job's measurements from its checkpoint: stage timings (the baseline ran on the original
        model), the closed loop's tries and the table's section; the plan they served is restored by pruning."""
        if state:
            self.stages.update(state.get("stages", {}))
            self.target = state.get("target", self.target)
            self.iterations = list(state.get("iterations", self.iterations))
            self.alignment = state.get("alignment", self.alignment)
            self._table_summary = {k: state[k] for k in _TABLE if k in state}


def check_faster(job: LatencyJob, strict: bool) -> str | None:
    """A slimmed model not faster than the original on the target runtime: an error for a latency target
    (never a success), a warning otherwise."""
    fin = job.stages.get("finetuned")
    if not fin or fin.get("ratio_to_baseline", 0.0) < 1.0:
        return None
    base = job.stages.get("baseline") or {}
    msg = (f"the slimmed model is not faster than the original on {job.settings.runtime} "
           f"({job.settings.device}, {job.settings.threads} threads, batch {job.settings.batch_size}): "
           f"{fin['ratio_to_baseline']:.3f}x the original's latency, timed interleaved with it (medians: "
           f"{base.get('median_ms', float('nan')):.3f} ms at the start, {fin['median_ms']:.3f} ms now)")
    if strict:
        raise SlimError(msg + "; ask for a larger amount or a different runtime", kind="not-faster")
    return msg

