"""The job as a list of stages: one state object, one ordered registry, one resume rule.

Why: resuming used to be woven through one long function as ``if ck[...]`` branches in every phase, so each
new step (the latency loop, say) meant another branch in each of them. Now a job is the registered stages run
in order over one :class:`JobState`: each stage reads what earlier ones left there and adds its own results.

**The resume rule**, the same for every stage (:func:`run_stages`):

- a stage that finished in an earlier attempt, and whose :meth:`Stage.outputs` are in the checkpoint, is
  skipped: :meth:`Stage.restore` puts its outputs back, and the report stages and warnings it had added come
  back with them (the runner records those itself, so a stage need not list them);
- every other stage runs; if the checkpoint was taken inside it (training stages save one per epoch: they
  train through :func:`train`), it gets a :class:`Resume` and continues from that epoch.

A stage whose results cannot be stored (a lifted graph is code, and checkpoints are loaded ``weights_only``;
an opened runtime) returns no outputs and simply runs again on resume, so it must be deterministic. Outputs
are read when a checkpoint is written, not when the stage ends: a record a later stage amends (the sparse
stage adds ``sparsity_reached`` to the pilot's) is stored as amended.

**A checkpoint** (format ``version`` 2) is ``{"version", "phase": the stage it was taken in, "epoch": epochs
done there, "model", "optimizer", "extra": that stage's own resume state, "done": {stage: {"outputs",
"stages", "warnings"}}}``. One written by the code before stages (no ``version``) is not read: the job
starts over (a note in the first progress message), which costs time but never a crash.

**Adding a stage** is one class in one module: subclass :class:`Stage`, decorate it with
``@STAGES.register("name", after="prune")`` (or ``before=``; without either it runs last), and have the
module imported before the job runs (``slimcore/stages/__init__.py`` imports the built-in ones in order;
``stages/latency.py`` is a plug-in placed by anchors).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from torch import nn

from .. import io
from ..errors import JobCanceled
from ..measure import count_flops, count_params, cpu_latency_ms
from ..registry import Registry
from ..report import ReportBuilder
from ..train import evaluate, fit

if TYPE_CHECKING:
    from ..checkpoint import CheckpointStore
    from ..groups import GroupSet
    from ..latency.job import LatencyJob
    from ..lift import Imported
    from ..methods import Method
    from ..prune import Plan
    from ..spec import DistillSpec, JobSpec, TrainSpec

CHECKPOINT_VERSION = 2
ProgressFn = Callable[[str, float, dict[str, Any]], None]
Measure = Callable[[str, nn.Module], dict[str, Any]]  # (report stage name, model) → extra numbers for it


def _silent(phase: str, frac: float, metrics: dict[str, Any]) -> None:
    return None


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


@dataclass(frozen=True)
class Resume:
    """Where the checkpoint left the stage it was taken in: epochs done, model and optimizer state, and the
    stage's own ``extra`` (the sparsity controller's state)."""

    epoch: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    extra: dict[str, Any]


class Stage:
    """One step of a job. ``run`` does the work on the job state; a stage whose results can be stored says
    what they are in ``outputs`` and how to put them back in ``restore`` (the resume rule, above)."""

    name: ClassVar[str] = ""  # set by STAGES.register

    def run(self, job: JobState, resume: Resume | None) -> None:
        raise NotImplementedError

    def outputs(self, job: JobState) -> dict[str, Any] | None:
        """What a checkpoint keeps of this finished stage (tensors, numbers, strings, lists, dicts); None: keep
        nothing, run again on resume."""
        return None

    def restore(self, job: JobState, outputs: dict[str, Any]) -> None:
        """Instead of ``run`` on resume, with what ``outputs`` returned in the earlier attempt."""
        raise NotImplementedError(f"stage {self.name!r} has outputs but no restore")


S = TypeVar("S", bound=type[Stage])


class StageRegistry(Registry[type[Stage]]):
    """The project's registry, kept in run order: a stage registers at the end, or ``after``/``before`` one
    already registered (how a plug-in such as the latency loop places itself without editing the others)."""

    def __init__(self) -> None:
        super().__init__("stage")
        self._order: list[str] = []

    def register(self, name: str, *, after: str | None = None, before: str | None = None) -> Callable[[S], S]:
        anchor = after or before
        if anchor is not None and anchor not in self._order:
            raise ValueError(f"stage {name!r} is to run {'after' if after else 'before'} {anchor!r}, "
                             f"which is not registered (known: {', '.join(self._order)})")

        def deco(cls: S) -> S:
            super(StageRegistry, self).register(name)(cls)
            cls.name = name
            at = len(self._order) if anchor is None else self._order.index(anchor) + (1 if after else 0)
            self._order.insert(at, name)
            return cls

        return deco

    def unregister(self, name: str) -> None:
        """Take a stage out again (tests that add one)."""
        self._items.pop(name, None)
        if name in self._order:
            self._order.remove(name)

    def ordered(self) -> list[str]:
        return list(self._order)

    def build(self) -> list[Stage]:
        """One instance of each stage, in run order, for one job."""
        return [self._items[n]() for n in self._order]


STAGES = StageRegistry()


@dataclass
class Finished:
    """A stage that ran (or was restored) in this attempt, with the report stages and warnings it added."""

    stage: Stage
    stages: dict[str, dict[str, Any]]
    warnings: list[str]

    def record(self, job: JobState) -> dict[str, Any] | None:
        outputs = self.stage.outputs(job)
        return None if outputs is None else {"outputs": outputs, "stages": self.stages, "warnings": self.warnings}


@dataclass
class JobState:
    """Everything the stages share. The first block is the job as asked; the fields after it are set by the
    stage named beside them (reading one before that stage ran is an AttributeError, not a silent None)."""

    model_path: Path
    spec: JobSpec
    data_path: Path
    out_path: Path
    workdir: Path | None = None
    device: str | None = None
    bundle_as: str | None = None
    say: ProgressFn = _silent
    should_stop: Callable[[], bool] | None = None
    checkpoints: CheckpointStore | None = None
    resumed_from: str | None = None
    t_start: float = field(default_factory=time.perf_counter)
    rb: ReportBuilder = field(default_factory=lambda: ReportBuilder({}))
    measures: list[Measure] = field(default_factory=list)  # extra numbers per report stage (latency plug-in)
    finished: list[Finished] = field(default_factory=list)
    latency: LatencyJob | None = None  # latency: the target runtime, when the spec measures one
    warm: dict[str, Any] | None = None  # pilot: the chosen pilot's state, for sparse training to continue from
    control: dict[str, Any] = field(default_factory=dict)  # sparse_training: the strength controller's record
    early: dict[str, Any] = field(default_factory=dict)  # sparse_training: where and why it stopped early
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each stage run in this attempt

    imported: Imported = field(init=False)  # import
    model: nn.Module = field(init=False)
    data: Any = field(init=False)  # slimcore.data's Dataset
    example: io.Inputs = field(init=False)
    calib: Any = field(init=False)  # batches of up to 512 training samples
    out_fmt: str = field(init=False)
    dev: torch.device = field(init=False)
    reinserted: list[str] = field(init=False)  # calibrate
    teacher: nn.Module | None = field(init=False)
    reference: nn.Module = field(init=False)
    gs: GroupSet = field(init=False)  # coupling
    bns: list[tuple[str, nn.Module]] = field(init=False)
    pilot: dict[str, Any] = field(init=False)  # pilot
    method: Method = field(init=False)
    gamma0: dict[str, torch.Tensor] = field(init=False)  # baseline
    sparse_state: dict[str, torch.Tensor] = field(init=False)  # sparse_training
    gamma1: dict[str, torch.Tensor] = field(init=False)
    plan: Plan = field(init=False)  # prune
    val: io.Inputs = field(init=False)
    before: Any = field(init=False)  # the original's outputs on ``val``
    removal: dict[str, Any] = field(init=False)
    kd: DistillSpec | None = field(init=False)  # finetuning
    kd_skipped: str | None = None  # finetuning: why distillation did not run although the spec asks for it
    final: dict[str, dict[str, float]] = field(init=False)  # export
    external: bool = field(init=False)
    bundle: str | None = field(init=False)
    written: int = field(init=False)
    channels_after: dict[str, int] = field(init=False)
    report: dict[str, Any] = field(init=False)  # report

    def measure(self, name: str, *, runtime: bool = True) -> None:
        """Evaluate the model as it is now into report stage ``name``: accuracy or distillation error, params,
        FLOPs, CPU latency, and (``runtime``) what the measure hooks add, such as the target runtime's timing."""
        model = self.model
        ev = evaluate(model, self.data.x_val, self.data.y_val, task=self.spec.task, teacher=self.teacher,
                      device=self.dev, output_names=self.imported.output_names)
        dev = next(model.parameters()).device
        one = io.apply(io.rows(self.example, slice(0, 1)), lambda t: t.to(dev))
        extra = {k: v for hook in self.measures for k, v in hook(name, model).items()} if runtime else {}
        self.rb.stage(name, **{**ev.as_dict(), "params": count_params(model), "flops": count_flops(model, one),
                               "latency_ms": round(cpu_latency_ms(model, self.example), 4), **extra})

    def checkpoint(self, phase: str, epoch: int, optimizer: dict[str, Any], extra: dict[str, Any]) -> None:
        """Save where stage ``phase`` is (called at the end of each training epoch) with every finished
        stage's outputs, so a worker that dies resumes here (no-op without a checkpoint store)."""
        if self.checkpoints is None:
            return
        done = {f.stage.name: rec for f in self.finished if (rec := f.record(self)) is not None}
        self.checkpoints.save({"version": CHECKPOINT_VERSION, "phase": phase, "epoch": epoch,
                               "model": cpu_state(self.model), "optimizer": optimizer, "extra": extra, "done": done})


def train(job: JobState, phase: str, train_spec: TrainSpec, method: Any, resume: Resume | None, *,
          start: tuple[int, dict[str, Any]] | None = None, stop: Callable[[int], bool] | None = None,
          kd: DistillSpec | None = None, extra: Callable[[], dict[str, Any]] = dict) -> None:
    """``fit`` with progress, a checkpoint per epoch (``extra()``: the stage's own resume state) and the
    resume point: the checkpoint's epoch when ``resume``, else ``start`` (a warm start's epoch and optimizer)."""
    epochs = max(train_spec.epochs, 1)
    if resume is not None:
        start = (resume.epoch, resume.optimizer)

    def report(m: dict[str, float]) -> None:
        job.say(phase, min(m.get("epoch", 0) / epochs, 1.0), m)

    def save(done: int, opt_state: dict) -> None:
        job.checkpoint(phase, done, opt_state, extra())

    data, spec = job.data, job.spec
    finished = fit(job.model, data.x_train, data.y_train, train_spec, task=spec.task,
                   teacher=job.teacher if kd is None else job.reference, method=method, device=job.dev,
                   seed=spec.seed, progress=report, should_stop=job.should_stop,
                   start_epoch=start[0] if start else 0, opt_state=start[1] if start else None, on_epoch_end=save,
                   stop_early=stop, kd=kd)
    if not finished:
        raise JobCanceled(phase)


def usable_checkpoint(ck: dict[str, Any] | None) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(the checkpoint to resume from or None, the first progress message's metrics). A checkpoint in the
    format before stages is not resumed from: the job starts over, and the message says why."""
    if ck is None:
        return None, {}
    if ck.get("version") != CHECKPOINT_VERSION:
        return None, {"restarted": "the checkpoint was written by an older version of slim: starting over"}
    return ck, {"resumed_from": f"{ck['phase']}:{ck['epoch']}"}


def run_stages(job: JobState, stages: Iterable[Stage], ck: dict[str, Any] | None) -> None:
    """Run ``stages`` in order over ``job``, resuming from ``ck`` by the one rule above."""
    done: dict[str, dict[str, Any]] = ck["done"] if ck is not None else {}
    for stage in stages:
        rec = done.get(stage.name)
        if rec is not None:
            job.rb.stages.update(rec["stages"])
            for w in rec["warnings"]:
                job.rb.warn(w)
            stage.restore(job, rec["outputs"])
            job.finished.append(Finished(stage, rec["stages"], rec["warnings"]))
            continue
        resume = None
        if ck is not None and ck["phase"] == stage.name:
            resume = Resume(ck["epoch"], ck["model"], ck["optimizer"], ck["extra"])
        known, n_warnings = set(job.rb.stages), len(job.rb.warnings)
        t0 = time.perf_counter()
        stage.run(job, resume)
        job.seconds[stage.name] = round(time.perf_counter() - t0, 3)
        job.finished.append(Finished(stage, {k: v for k, v in job.rb.stages.items() if k not in known},
                                     job.rb.warnings[n_warnings:]))
