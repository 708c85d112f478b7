"""``finetuning``: the pruned model trained back (with distillation from the original when the spec asks),
a checkpoint per epoch (:func:`.state.train`).

It keeps no outputs: once it is done the job only exports, which writes no checkpoint, so a job that dies
while exporting resumes from the last fine-tuning epoch, which has nothing left to train and re-evaluates.
"""

from __future__ import annotations

from .state import STAGES, JobState, Resume, Stage, train


@STAGES.register("finetuning")
class Finetuning(Stage):
    def run(self, job: JobState, resume: Resume | None) -> None:
        if resume is not None:
            job.model.load_state_dict(resume.model)
        job.say("finetuning", 0.0, {})
        job.kd = job.spec.finetune.distillation() if job.spec.task == "classification" else None
        train(job, "finetuning", job.spec.finetune, None, resume, kd=job.kd)
        job.measure("finetuned")
