"""The last stages, in the ``exporting`` phase: ``export`` (write the slimmed model in the upload's layout,
checked against the pruned module by the exporter) and ``report`` (the gamma report: CONTRACT.md's keys plus
the README's, and the warnings that compare stages).

Neither keeps outputs: nothing after them writes a checkpoint, so a job that dies here resumes from the last
fine-tuning epoch and runs them again.
"""

from __future__ import annotations

import time

import torch

from .. import io
from ..export import EXPORTERS
from ..external_data import deliver, upload_bytes
from ..report import REMOVAL_BOUND, layer_table, removal_cost
from .pruning import per_output
from .state import STAGES, JobState, Resume, Stage


@STAGES.register("export")
class Export(Stage):
    def run(self, job: JobState, resume: Resume | None) -> None:
        job.say("exporting", 0.0, {})
        model, imported, fmt, spec = job.model, job.imported, job.out_fmt, job.spec
        model.cpu().float().eval()
        with torch.no_grad():
            job.final = per_output(io.call(model, job.val), job.before, imported.output_names)
        job.external = external = fmt == "onnx" and bool(imported.meta.get("onnx_external_data"))
        job.bundle = imported.meta["bundle"] if fmt == "onnx" and imported.meta["bundle"] else \
            job.bundle_as if external else None
        job.written = deliver(lambda dest: EXPORTERS.get(fmt)(model, imported, dest, job.example), job.out_path,
                              external=external, bundle=job.bundle, inner_name=imported.meta["model_file"],
                              workdir=job.workdir)
        job.channels_after = after = {name: int(bn.num_features) for name, bn in job.bns}
        odd = [n for n, c in after.items() if c % 8 and n in job.gamma0 and c != job.gamma0[n].numel()]
        if fmt == "onnx" and spec.prune.round_to == 1 and odd and job.plan.target != "latency":
            job.rb.warn(f"{len(odd)} pruned layers keep channel counts that are not multiples of 8 (e.g. {odd[0]}: "
                        f"{after[odd[0]]}); onnxruntime on CPU can run such a model slower than the original "
                        f"(bench/README.md: MobileNetV2 1.34× slower at 30%); set prune.round_to: \"auto\" "
                        f"(measured) or 8")


@STAGES.register("report")
class Report(Stage):
    def run(self, job: JobState, resume: Resume | None) -> None:
        rb, p, spec, pilot, control = job.rb, job.plan, job.spec, job.pilot, job.control
        removal = removal_cost(rb, job.removal["culprits"])  # may warn: before the warnings comparing stages
        _compare_stages(job)
        reached = pilot.get("sparsity_reached")
        if reached is not None and reached < pilot["stop_at"]:
            rb.warn(f"the strength pilot aimed for {pilot['wanted_fraction']:.0%} of channels near zero after sparse "
                    f"training and reached {reached:.0%}: removal cost more accuracy than it needed to; give more "
                    f"sparse_training.epochs, more method.pilot_runs, or a method.strength")
        # short of its aim is worth a warning only where the removal then cost something (the aim is a means: ISTA
        # at 70% of channels reached 63% at zero and lost 0.2 points to the removal, well within the bound)
        costly = removal["cost"] is None or removal["cost"] > REMOVAL_BOUND / 3
        short = control.get("used") and (control.get("near_zero_reached") or 0) < control["wanted_fraction"] - 0.05
        if short and costly:
            rb.warn(f"the strength controller aimed for {control['wanted_fraction']:.0%} of channels near zero and "
                    f"reached {control['near_zero_reached']:.0%} (final strength {control['final_strength']:g}): "
                    f"removal cost more accuracy than it needed to; give more sparse_training.epochs or a "
                    f"method.strength")
        imported, kd, gs, before, lat = job.imported, job.kd, job.gs, job.before, job.latency
        rb.extra.update({
            "format": {"in": imported.fmt, "out": job.out_fmt, "external_data": job.external, "bundle": job.bundle},
            "target": {"kind": p.target, "requested": p.requested, "achieved": round(p.achieved, 6),
                       "ranking": p.ranking},
            "bn_recalibration": job.removal.get("recalibrated_bn"),
            "removed_channels": p.removed_channels,
            "output_deviation_relative": job.removal["relative"],
            "output_deviation_per_output": job.removal["per_output"], "output_error_finetuned": job.final,
            "inputs": [{"name": n, "shape": list(s[1:])} for n, s in zip(imported.input_names,
                                                                         imported.input_shapes, strict=True)],
            "input_shape_from": imported.meta.get("input_shape_from"),  # spec, data (.npz x) or model file
            "outputs": [{"name": n, "shape": list(t.shape[1:])} for n, t in io.named_leaves(before,
                                                                                          imported.output_names)],
            "output_structure": io.structure(before),
            "data": {"train": io.num_rows(job.data.x_train), "val": io.num_rows(job.data.x_val),
                     "val_source": job.data.val_source, "source": job.data.source,
                     "loader_workers": job.data.workers, "augment": spec.data.augment},
            "device": str(job.dev), "wall_seconds": round(time.perf_counter() - job.t_start, 3),
            # where the time went, per stage (this attempt's: a resumed job lists the stages it ran again)
            "stage_seconds": dict(job.seconds),
            "resumed_from": job.resumed_from,
            "reinserted_bn": job.reinserted,
            "sparse_training_stopped_early_at": job.early.get("epoch"),
            "sparse_training_stopped_because": job.early.get("why"),
            "spec": spec.model_dump(mode="json"),  # every setting as run, defaults filled in
            "removal_cost": removal,
            "pilot": pilot, "strength_control": control, "latency": lat.report() if lat is not None else None,
            "finetune_distillation": kd.model_dump() if kd is not None else None,
            "finetune_distillation_skipped": job.kd_skipped,
            "not_pruned": gs.skipped, "output_layers": gs.output_layers,
            "prunable_bn_channels": {**gs.coverage,
                                     "share": round(gs.coverage["prunable"] / max(gs.coverage["total"], 1), 4)},
        })
        external = [] if imported.meta["bundle"] else imported.meta.get("onnx_external_data", [])
        job.report = rb.build(threshold=p.threshold,
                              layers=layer_table(job.gamma0, job.gamma1, job.channels_after, p.threshold),
                              model_bytes={"before": upload_bytes(job.model_path, external), "after": job.written},
                              output_deviation=job.removal["deviation"])
        job.say("exporting", 1.0, {})


def _compare_stages(job: JobState) -> None:
    """Warnings that read the stages side by side: sparse training or fine-tuning that cost accuracy, and a
    channel share that removed few parameters."""
    rb, spec, p = job.rb, job.spec, job.plan
    base, fin = rb.stages["baseline"], rb.stages["finetuned"]
    sparse_acc = rb.stages.get("sparse", {}).get("accuracy")
    if spec.task == "classification" and base["accuracy"] is not None and sparse_acc is not None \
            and sparse_acc < base["accuracy"] - 0.2:
        rb.warn(f"sparse training itself dropped accuracy from {base['accuracy']:.3f} to {sparse_acc:.3f} before "
                f"anything was removed: the penalty strength ({rb.method['strength']:g}) is too high for this "
                f"schedule (or sparse_training.lr is); lower method.strength")
    if spec.task == "classification" and base["accuracy"] is not None and fin["accuracy"] is not None \
            and fin["accuracy"] < base["accuracy"] - 0.05:
        rb.warn(f"accuracy dropped from {base['accuracy']:.3f} to {fin['accuracy']:.3f} after fine-tuning; "
                f"consider more fine-tuning epochs or a smaller amount")
    params_gone = 1 - fin["params"] / max(base["params"], 1)
    if p.target == "channels" and params_gone < 0.5 * p.achieved:
        rb.warn(f"{p.achieved:.0%} of prunable channels went but only {params_gone:.0%} of parameters: the global "
                f"|γ| ranking took them mostly from narrow layers; to shrink the model, use prune.target 'params'")
