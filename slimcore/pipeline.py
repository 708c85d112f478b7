"""The whole slimming job: import → sparse training → pruning → fine-tuning → export → report.

``slim run`` and the service's worker both call :func:`run_job`; the worker passes ``progress`` and
``should_stop`` callbacks and a checkpoint store. The job is the stages registered in
:mod:`slimcore.stages`, run in order over one :class:`~slimcore.stages.JobState`, and resumed by one rule
(:mod:`slimcore.stages.state`). Every way a job could 'succeed' while doing nothing useful (no BatchNorm,
all γ equal, nothing removed, target missed, export differing) ends in an error or a report warning.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointStore
from .export import EXPORTERS
from .lift import IMPORTERS
from .spec import JobSpec
from .stages import STAGES, JobState, ProgressFn, run_stages, usable_checkpoint
from .stages.importing import import_model, load_plugins

__all__ = ["EXPORTERS", "IMPORTERS", "PHASES", "ProgressFn", "import_model", "run_job"]

PHASES = ("importing", "sparse_training", "pruning", "finetuning", "exporting")
_load_plugins = load_plugins  # the name tests and bench scripts import


def run_job(model_path: Path, spec: JobSpec, data_path: Path, out_path: Path, *,
            workdir: Path | None = None, progress: ProgressFn | None = None,
            should_stop: Callable[[], bool] | None = None, device: str | None = None,
            checkpoints: CheckpointStore | None = None, bundle_as: str | None = None) -> dict[str, Any]:
    """Run (or resume, when ``checkpoints`` holds one) a whole job; returns the gamma report.

    The result keeps the upload's layout (:mod:`.external_data`); ``bundle_as`` (``zip``) packs an
    external-data result of an upload that was not a bundle, as the service does for one download.
    Raises SlimError subclasses for bad input and JobCanceled when ``should_stop`` fires.
    """
    job = JobState(model_path, spec, data_path, out_path, workdir=workdir, device=device, bundle_as=bundle_as,
                   should_stop=should_stop, checkpoints=checkpoints)
    torch.manual_seed(spec.seed)
    if progress is not None:
        job.say = progress
    ck, first = usable_checkpoint(checkpoints.load() if checkpoints is not None else None)
    job.resumed_from = first.get("resumed_from")
    job.say("importing", 0.0, first)
    run_stages(job, STAGES.build(), ck)
    return job.report
