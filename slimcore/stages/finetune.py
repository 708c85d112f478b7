"""``finetuning``: the pruned model trained back (with distillation from the original when the spec asks),
a checkpoint per epoch (:func:`.state.train`).

Distillation is skipped, and the report says why, when the original is measurably worse on the validation
split than the student already is (the sparse-trained model before removal, or the pruned one): an upload
trained too briefly then teaches a worse function than the student has (ResNet-18 trained 4 epochs on the
digits: 0.806 original, 0.982 right after pruning, 0.909 after fine-tuning toward the original;
bench/README.md, issue 11).

It keeps no outputs: once it is done the job only exports, which writes no checkpoint, so a job that dies
while exporting resumes from the last fine-tuning epoch, which has nothing left to train and re-evaluates.
"""

from __future__ import annotations

from typing import Any

from .state import STAGES, JobState, Resume, Stage, train

WORSE_TEACHER = 0.01  # the original this much (accuracy) below the sparse model: no distillation


@STAGES.register("finetuning")
class Finetuning(Stage):
    def run(self, job: JobState, resume: Resume | None) -> None:
        if resume is not None:
            job.model.load_state_dict(resume.model)
        job.say("finetuning", 0.0, {})
        job.kd = job.spec.finetune.distillation() if job.spec.task == "classification" else None
        job.kd_skipped = _worse_teacher(job.rb.stages) if job.kd is not None else None
        if job.kd_skipped is not None:  # the spec asked for distillation: say loudly that it did not run
            job.kd = None
            job.rb.warn(f"distillation skipped: {job.kd_skipped}")
        train(job, "finetuning", job.spec.finetune, None, resume, kd=job.kd)
        job.measure("finetuned")


def _worse_teacher(stages: dict[str, Any]) -> str | None:
    """Why distillation from the original would teach a worse function, or None."""
    base = stages.get("baseline", {}).get("accuracy")
    student = {k: stages.get(k, {}).get("accuracy") for k in ("sparse", "pruned")}
    best = max(((v, k) for k, v in student.items() if v is not None), default=None)
    if base is None or best is None or base >= best[0] - WORSE_TEACHER:
        return None
    what = "sparse-trained model's before removal" if best[1] == "sparse" else "pruned model's"
    return (f"the original model (the teacher) scores {base:.3f} on the validation split, below the {what} "
            f"{best[0]:.3f}: fine-tuned on labels only")
