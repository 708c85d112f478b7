"""``pilot`` (the strength search, which ends with the sparsity method built at the strength it chose) and
``baseline`` (the uploaded model's numbers and |γ| before anything changed).

Both keep their results in a checkpoint: the pilot's record (its runs cost about one sparse-training phase)
and the baseline's γ snapshot (its report numbers come back through the runner). The pilot's warm start (the
chosen run's model and optimizer) is not kept: it only matters before sparse training's first checkpoint, and
a resumed job continues from that checkpoint instead.
"""

from __future__ import annotations

from typing import Any

from ..methods import METHODS, MethodContext
from ..report import gamma_snapshot
from ..strength import choose_strength
from .state import STAGES, JobState, Resume, Stage


def build_method(job: JobState) -> None:
    """The spec's method at the pilot's strength (the spec's own, or the paper default, when it chose none)."""
    spec = job.spec
    strength = job.pilot["strength"]
    mspec = spec.method if strength is None else spec.method.model_copy(update={"strength": strength})
    job.method = METHODS.get(spec.method.name)(mspec, MethodContext(job.model, job.gs, [b for _, b in job.bns],
                                                                    job.example))
    job.rb.method.update({"name": spec.method.name, **job.method.describe()})


@STAGES.register("pilot")
class Pilot(Stage):
    def run(self, job: JobState, resume: Resume | None) -> None:
        job.warm, job.pilot = choose_strength(job.model, job.spec, job.data, job.example, job.gs,
                                              job.imported.meta.get("unprunable"), device=job.dev,
                                              teacher=job.teacher, should_stop=job.should_stop, say=job.say)
        build_method(job)

    def outputs(self, job: JobState) -> dict[str, Any]:
        return {"pilot": job.pilot}

    def restore(self, job: JobState, outputs: dict[str, Any]) -> None:
        job.pilot = outputs["pilot"]
        build_method(job)


@STAGES.register("baseline")
class Baseline(Stage):
    def run(self, job: JobState, resume: Resume | None) -> None:
        job.gamma0 = gamma_snapshot(job.bns)
        job.measure("baseline")

    def outputs(self, job: JobState) -> dict[str, Any]:
        return {"gamma0": job.gamma0}

    def restore(self, job: JobState, outputs: dict[str, Any]) -> None:
        job.gamma0 = outputs["gamma0"]
