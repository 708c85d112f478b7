"""``prune``: plan which channels go (one global threshold, or a FLOPs/params/latency target) and remove them.

Its outputs are the plan (which channels of which group, threshold, target reached) and what the removal
cost before fine-tuning. A resumed job does not plan again (a latency plan is timed, so a second one could
differ from the structure the fine-tuning checkpoint holds): it re-applies the stored removal to the sparse
model, which rebuilds the pruned structure without any pickled graph code.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import io
from ..errors import NothingToPrune, SlimError
from ..prune import Plan, apply, plan, removal_culprits
from ..recalibrate import recalibrate_if_closer
from .state import STAGES, JobState, Resume, Stage


def per_output(got: Any, want: Any, names: Any) -> dict[str, dict[str, float]]:
    """Per output (by name), how far ``got`` is from ``want`` on the same held-out inputs: the largest
    absolute change, that relative to the original's largest value, and the squared error relative to
    the original's power (the distillation error's measure)."""
    result = {}
    for (name, a), (_, b) in zip(io.named_leaves(got, names), io.named_leaves(want, names), strict=True):
        power = float(b.double().pow(2).sum())
        result[name] = {"max_abs": io.max_abs_diff(a, b), "relative": io.rel_error(a, b),
                        "relative_squared": float((a.double() - b.double()).pow(2).sum()) / power if power else 0.0}
    return result


def _on_cpu(job: JobState) -> None:
    """Removal rewrites modules and groups on the CPU, in float32."""
    job.model.cpu().float()
    job.gs.to(torch.device("cpu"))


def _held_out(job: JobState) -> None:
    """The original's outputs on up to 512 held-out samples: what the removal, and later the export, are
    compared against."""
    job.val = io.rows(job.data.x_val, slice(0, 512))
    with torch.no_grad():
        job.before = io.call(job.reference, job.val)


def _prune_spec(job: JobState) -> Any:
    """The spec's prune block; a ``threshold`` target without an amount cuts at the |γ| histogram's valley."""
    prune_spec = job.spec.prune
    if prune_spec.target == "threshold" and "amount" not in prune_spec.model_fields_set:
        from ..methods.polarization import first_valley_threshold

        valley = first_valley_threshold(job.method.channel_importance(job.gs))
        if valley is None:
            raise SlimError("prune.target 'threshold' without an amount needs a valley in the |γ| histogram, and "
                            "there is none; give prune.amount or train longer (polarization separates γ)")
        prune_spec = prune_spec.model_copy(update={"amount": valley})
    return prune_spec


def _recalibrate(job: JobState) -> dict[str, Any]:
    """``prune.recalibrate_bn``: BatchNorm statistics re-measured on the pruned network when that brings it
    closer to the original on the held-out samples (slimcore/recalibrate.py). Leaves the model in eval mode."""
    job.model.eval()
    if not job.spec.prune.recalibrate_bn:
        return {"layers": 0, "kept": False, "why": "prune.recalibrate_bn is false"}
    return recalibrate_if_closer(job.model, job.calib, job.val, job.before)


@STAGES.register("prune")
class Prune(Stage):
    def run(self, job: JobState, resume: Resume | None) -> None:
        model, gs, method, spec = job.model, job.gs, job.method, job.spec
        job.say("pruning", 0.0, {})
        _on_cpu(job)
        imps = torch.cat([g.importance(method.reduce) for g in gs.groups])
        if float(imps.max() - imps.min()) <= 1e-12:
            raise NothingToPrune("all BatchNorm γ are equal (an untrained network?), so |γ| cannot rank channels; "
                                 "run sparse training (sparse_training.epochs > 0) or upload a trained model")
        within = bool(job.control.get("used")) and method.steered_cut_within_layer
        p = plan(model, gs, _prune_spec(job), method.reduce, job.example, latency=job.latency, within_layer=within)
        if p.removed_channels == 0:
            raise NothingToPrune(f"nothing to remove: no channel's importance is below the threshold "
                                 f"({spec.prune.target}={spec.prune.amount:g}); lower min_channels, raise the amount "
                                 f"or train longer with a stronger penalty")
        for w in p.warnings:
            job.rb.warn(w)
        _held_out(job)
        culprits = removal_culprits(gs, p, method.reduce)
        apply(model, gs, p.remove, job.calib)
        recalibrated = _recalibrate(job)
        with torch.no_grad():
            after = io.call(model, job.val)
        p.ranking = "within_layer" if within else "global"
        job.plan = p
        job.removal = {"deviation": io.max_abs_diff(after, job.before), "relative": io.rel_error(after, job.before),
                       "per_output": per_output(after, job.before, job.imported.output_names), "culprits": culprits,
                       "recalibrated_bn": recalibrated}
        job.measure("pruned")
        job.say("pruning", 1.0, {"removed_channels": p.removed_channels})

    def outputs(self, job: JobState) -> dict[str, Any]:
        p = job.plan
        return {"plan": {"target": p.target, "requested": p.requested, "threshold": p.threshold, "remove": p.remove,
                         "achieved": p.achieved, "warnings": p.warnings, "ranking": p.ranking},
                "removal": job.removal}

    def restore(self, job: JobState, outputs: dict[str, Any]) -> None:
        _on_cpu(job)
        _held_out(job)
        job.plan = Plan(**outputs["plan"])
        job.removal = outputs["removal"]
        apply(job.model, job.gs, job.plan.remove, job.calib)
        _recalibrate(job)
