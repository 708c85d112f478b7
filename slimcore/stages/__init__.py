"""The job's stages: importing their modules registers them, in this order.

import → calibrate → coupling → pilot → baseline → sparse_training → prune → finetuning → export → report,
plus the latency plug-in (``latency`` after calibrate, ``latency_check`` after finetuning), which places
itself by anchors. The state, the registry and the resume rule are in :mod:`.state`.
"""

from __future__ import annotations

import importlib

from .state import STAGES, JobState, ProgressFn, Resume, Stage, run_stages, usable_checkpoint

# Run order for the modules that register at the end; plug-ins (latency) place themselves with after=/before=.
for _module in ("importing", "pilot", "sparse", "pruning", "finetune", "exporting", "latency"):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["STAGES", "JobState", "ProgressFn", "Resume", "Stage", "run_stages", "usable_checkpoint"]
