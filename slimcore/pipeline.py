"""The whole slimming job: import → sparse training → pruning → fine-tuning → export → report.

``slim run`` and the service's worker both call :func:`run_job`; the worker passes ``progress`` and
``should_stop`` callbacks. Every way a job could 'succeed' while doing nothing useful (no BatchNorm,
all γ equal, nothing removed, target missed, export differing) ends in an error or a report warning.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import export as _export  # noqa: F401  (registers exporters)
from . import io
from . import lift as _lift  # noqa: F401
from .checkpoint import CheckpointStore
from .control import Steered, make_controller
from .data import load_dataset
from .errors import JobCanceled, NothingToPrune, SlimError
from .export import EXPORTERS
from .external_data import deliver, open_model, upload_bytes
from .formats import detect_format
from .groups import all_bns, build_groups
from .latency.job import LatencyJob, check_faster
from .lift import IMPORTERS, Imported
from .measure import count_flops, count_params, cpu_latency_ms
from .methods import METHODS, MethodContext
from .prune import apply, plan, removal_culprits
from .report import ReportBuilder, gamma_snapshot, layer_table, removal_cost
from .shape_limits import data_sample_shape, peek_npz_sample_shape
from .spec import JobSpec
from .strength import back_to_pilot_if_wrecked, choose_strength, plateau_stop
from .train import device_of, evaluate, fit

PHASES = ("importing", "sparse_training", "pruning", "finetuning", "exporting")
ProgressFn = Callable[[str, float, dict[str, Any]], None]


def _load_plugins() -> None:
    """Importers and exporters register themselves on import. TorchScript and .pt2 load now; ONNX's load on
    first use (``Registry.lazy``: ``import onnx`` alone costs 1.5 s, paid by every job in a fresh worker)."""
    import importlib

    for mod in ("slimcore.lift.torchscript", "slimcore.lift.exported", "slimcore.export.pt2",
                "slimcore.export.torchscript"):
        importlib.import_module(mod)
    IMPORTERS.lazy("onnx", "slimcore.lift.onnx_import")
    EXPORTERS.lazy("onnx", "slimcore.export.onnx")


def import_model(path: Path, spec: JobSpec, workdir: Path | None = None) -> Imported:
    """Lift the upload: a model file, a folder holding one ``.onnx`` with its data files, or a bundle of
    them (extracted under ``workdir``); ``meta["bundle"]`` and ``meta["model_file"]`` say which it was."""
    _load_plugins()
    source = open_model(path, workdir)
    fmt = detect_format(source.path)
    if fmt not in IMPORTERS:
        raise SlimError(f"{fmt} models are not supported yet (supported: {', '.join(IMPORTERS.names())})")
    shapes = spec.shapes()
    imported = IMPORTERS.get(fmt)(source.path, shapes[0] if shapes and len(shapes) == 1 else shapes)
    imported.meta.update(bundle=source.bundle, model_file=source.path.name)
    return imported


def _stage(model: torch.nn.Module, ev: Any, example: io.Inputs, lat: LatencyJob | None = None,
           name: str = "") -> dict[str, Any]:
    """A stage's numbers; with a target runtime (``lat``), its latency there too (median and p90)."""
    dev = next(model.parameters()).device
    one = io.apply(io.rows(example, slice(0, 1)), lambda t: t.to(dev))
    extra = {"runtime_latency": lat.stage(name, model).as_dict()} if lat is not None else {}
    return {**ev.as_dict(), "params": count_params(model), "flops": count_flops(model, one),
            "latency_ms": round(cpu_latency_ms(model, example), 4), **extra}


def _onnx_writer(imported: Imported, example: io.Inputs) -> Callable[[torch.nn.Module, Path], Path]:
    """How a candidate reaches onnxruntime or TensorRT: the job's own ONNX exporter, on a copy."""
    def write(model: torch.nn.Module, dest: Path) -> Path:
        EXPORTERS.get("onnx")(copy.deepcopy(model).cpu(), imported, dest, example)
        return dest
    return write


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def run_job(model_path: Path, spec: JobSpec, data_path: Path, out_path: Path, *,
            workdir: Path | None = None, progress: ProgressFn | None = None,
            should_stop: Callable[[], bool] | None = None, device: str | None = None,
            checkpoints: CheckpointStore | None = None, bundle_as: str | None = None) -> dict[str, Any]:
    """Run (or resume, when ``checkpoints`` holds one) a whole job; returns the gamma report.

    The result keeps the upload's layout (:mod:`.external_data`); ``bundle_as`` (``zip``) packs an
    external-data result of an upload that was not a bundle, as the service does for one download.
    Raises SlimError subclasses for bad input and JobCanceled when ``should_stop`` fires.
    """
    t_start = time.perf_counter()
    torch.manual_seed(spec.seed)
    say: ProgressFn = progress or (lambda phase, frac, metrics: None)
    ck = checkpoints.load() if checkpoints is not None else None
    say("importing", 0.0, {"resumed_from": f"{ck['phase']}:{ck['epoch']}"} if ck else {})
    say("importing", 0.1, {"step": "lifting the model graph"})
    with data_sample_shape(peek_npz_sample_shape(data_path)):  # checked before the importer allocates
        imported = import_model(model_path, spec, workdir)
    model = imported.module
    say("importing", 0.4, {"step": "reading the data"})
    data = load_dataset(data_path, task=spec.task, input_shape=imported.input_shapes, seed=spec.seed,
                        workdir=workdir, options=spec.data)
    example = io.apply(io.rows(data.x_train, slice(0, 2)), torch.clone)
    _check_fit(model, data, spec, imported)
    out_fmt = imported.fmt if spec.export.format == "same" else spec.export.format
    lat = LatencyJob.open(spec.prune, out_fmt, _onnx_writer(imported, example), example,
                          None if imported.dynamic_batch else imported.input_shape[0])  # fails now, not after training
    calib = io.batches(io.rows(data.x_train, slice(0, 512)), 128)
    reinserted: list[str] = []
    if imported.fmt == "onnx":
        # Exporters fold BatchNorm into Conv: give those convs a γ again (function unchanged at the start;
        # folded back at export). Before any checkpoint is restored: the saved state includes these BNs.
        from .lift.bn_insert import reinsert_bn

        reinserted = reinsert_bn(model, calib)
    dev = device_of(device)
    teacher = copy.deepcopy(model).eval() if spec.task == "distillation" else None
    reference = copy.deepcopy(model).eval()
    if lat is not None:
        lat.reference = reference
    names = imported.output_names
    say("importing", 0.8, {"step": "analysing channel coupling"})
    gs = build_groups(model, example, spec.prune.ignore, imported.meta.get("unprunable"))
    say("importing", 1.0, {"step": "channel groups found", "groups": len(gs.groups)})
    bns = all_bns(model)
    warm: dict[str, Any] | None = None
    early: dict[str, Any] = {}
    if ck is not None and "pilot" in ck:
        pilot = ck["pilot"]
    else:
        warm, pilot = choose_strength(model, spec, data, example, gs, imported.meta.get("unprunable"), device=dev,
                                teacher=teacher, should_stop=should_stop, say=say)
    mspec = spec.method if pilot["strength"] is None else spec.method.model_copy(update={"strength": pilot["strength"]})
    method = METHODS.get(spec.method.name)(mspec, MethodContext(model, gs, [b for _, b in bns], example))
    rb = ReportBuilder({"name": spec.method.name, **method.describe()})
    for root, why in gs.skipped.items():
        rb.warn(f"layer {root} is not pruned: {why}")
    gamma0 = gamma_snapshot(bns)
    if ck:
        rb.stages.update(ck["stages"])
        gamma0 = ck["gamma0"]
    else:
        ev = evaluate(model, data.x_val, data.y_val, task=spec.task, teacher=teacher, device=dev, output_names=names)
        rb.stage("baseline", **_stage(model, ev, example, lat, "baseline"))

    control: dict[str, Any] = ck.get("control_record", {}) if ck else {}
    ctl = None

    def fit_phase(phase: str, train_spec: Any, meth: Any, extra: dict[str, Any],
                  start: tuple[int, dict[str, Any]] | None = None, kd: Any = None) -> None:
        epochs = max(train_spec.epochs, 1)
        if ck is not None and ck["phase"] == phase:
            start = (ck["epoch"], ck["optimizer"])

        def report(m: dict[str, float]) -> None:
            say(phase, min(m.get("epoch", 0) / epochs, 1.0), m)

        def save(done: int, opt_state: dict) -> None:
            if checkpoints is not None:
                steer = {"control": ctl.state()} if ctl is not None and phase == "sparse_training" else {}
                checkpoints.save({"phase": phase, "epoch": done, "model": _cpu_state(model), "pilot": pilot,
                                  "optimizer": opt_state, "stages": rb.stages, "gamma0": gamma0,
                                  "control_record": control, **steer, **extra})

        stop = plateau_stop(meth, gs, early, pilot) if meth is not None and ctl is None else None
        finished = fit(model, data.x_train, data.y_train, train_spec, task=spec.task,
                       teacher=teacher if kd is None else reference, method=meth if ctl is None or meth is None
                       else Steered(meth, ctl), device=dev, seed=spec.seed, progress=report,
                       should_stop=should_stop, start_epoch=start[0] if start else 0,
                       opt_state=start[1] if start else None, on_epoch_end=save, stop_early=stop, kd=kd)
        if not finished:
            raise JobCanceled(phase)

    if ck is None or ck["phase"] == "sparse_training":
        if spec.sparse_training.epochs > 0:
            method.prepare(model)  # e.g. receding's bounded BN; checkpoints hold the prepared form
        start = None
        if ck is not None:
            model.load_state_dict(ck["model"])
        elif warm is not None:  # the chosen pilot is this run's beginning
            model.load_state_dict(warm["model"])
            start = (warm["epoch"], warm["optimizer"])
            if warm["sparsity"] >= pilot["stop_at"]:
                start = (spec.sparse_training.epochs, warm["optimizer"])
                early.update(epoch=warm["epoch"], why=f"{warm['sparsity']:.0%} of channels near zero after the "
                                                      f"pilot's {warm['epoch']} epochs, the target")
        resumed = ck is not None and ck["phase"] == "sparse_training"
        ctl, control = make_controller(model, method, spec, data, gs, example, device=dev, teacher=teacher,
                                       state=ck.get("control") if resumed else None,
                                       start_epoch=ck["epoch"] if resumed else 0)
        say("sparse_training", 0.0, {})
        fit_phase("sparse_training", spec.sparse_training, method, {}, start)
        if ctl is not None:
            control = ctl.record()
        back = back_to_pilot_if_wrecked(model, data, warm, pilot, dev) if ck is None else None
        if back is not None:
            rb.warn(back)
            early.update(epoch=warm["epoch"] if warm else None, why=back)
        warm = None  # the pilot's model and optimizer copies are no longer needed: free them before pruning
        if pilot["used"]:
            pilot["sparsity_reached"] = round(method.sparsity(gs, pilot["sparsity_threshold"]), 4)
        if spec.sparse_training.epochs > 0:
            method.finalize(model)  # plain BatchNorms again, |γ| = importance
        ev = evaluate(model, data.x_val, data.y_val, task=spec.task, teacher=teacher, device=dev, output_names=names)
        rb.stage("sparse", **_stage(model, ev, example))
        sparse_state = _cpu_state(model)
    else:
        sparse_state = ck["sparse_final"]
        model.load_state_dict(sparse_state)
    gamma1 = gamma_snapshot(bns)

    say("pruning", 0.0, {})
    model.cpu().float()
    gs.to(torch.device("cpu"))
    imps = torch.cat([g.importance(method.reduce) for g in gs.groups])
    if float(imps.max() - imps.min()) <= 1e-12:
        raise NothingToPrune("all BatchNorm γ are equal (an untrained network?), so |γ| cannot rank channels; "
                             "run sparse training (sparse_training.epochs > 0) or upload a trained model")
    prune_spec = spec.prune
    if prune_spec.target == "threshold" and "amount" not in prune_spec.model_fields_set:
        from .methods.polarization import first_valley_threshold

        valley = first_valley_threshold(method.channel_importance(gs))
        if valley is None:
            raise SlimError("prune.target 'threshold' without an amount needs a valley in the |γ| histogram, and "
                            "there is none; give prune.amount or train longer (polarization separates γ)")
        prune_spec = prune_spec.model_copy(update={"amount": valley})
    if lat is not None:
        lat.restore({"stages": {k: v["runtime_latency"] for k, v in rb.stages.items() if "runtime_latency" in v}})
    p = plan(model, gs, prune_spec, method.reduce, example, latency=lat)
    if p.removed_channels == 0:
        raise NothingToPrune(f"nothing to remove: no channel's importance is below the threshold "
                             f"({spec.prune.target}={spec.prune.amount:g}); lower min_channels, raise the amount "
                             f"or train longer with a stronger penalty")
    for w in p.warnings:
        rb.warn(w)
    val = io.rows(data.x_val, slice(0, 512))
    with torch.no_grad():
        before = io.call(reference, val)
    culprits = removal_culprits(gs, p, method.reduce)
    apply(model, gs, p.remove, calib)
    model.eval()
    with torch.no_grad():
        after_ = io.call(model, val)
    deviation = io.max_abs_diff(after_, before)
    per_output = _per_output(after_, before, names)
    if ck is None or ck["phase"] == "sparse_training":
        ev = evaluate(model, data.x_val, data.y_val, task=spec.task, teacher=teacher, device=dev, output_names=names)
        rb.stage("pruned", **_stage(model, ev, example, lat, "pruned"))
    say("pruning", 1.0, {"removed_channels": p.removed_channels})

    if ck is not None and ck["phase"] == "finetuning":
        model.load_state_dict(ck["model"])
    say("finetuning", 0.0, {})
    kd = spec.finetune.distillation() if spec.task == "classification" else None
    fit_phase("finetuning", spec.finetune, None, {"sparse_final": sparse_state}, kd=kd)
    ev = evaluate(model, data.x_val, data.y_val, task=spec.task, teacher=teacher, device=dev, output_names=names)
    rb.stage("finetuned", **_stage(model, ev, example, lat, "finetuned"))
    not_faster = check_faster(lat, strict=p.target == "latency") if lat is not None else None

    say("exporting", 0.0, {})
    fmt = imported.fmt if spec.export.format == "same" else spec.export.format
    model.cpu().float().eval()
    with torch.no_grad():
        final = _per_output(io.call(model, val), before, names)
    external = fmt == "onnx" and bool(imported.meta.get("onnx_external_data"))
    bundle = imported.meta["bundle"] if fmt == "onnx" and imported.meta["bundle"] else bundle_as if external else None
    written = deliver(lambda dest: EXPORTERS.get(fmt)(model, imported, dest, example), out_path, external=external,
                      bundle=bundle, inner_name=imported.meta["model_file"], workdir=workdir)
    outputs = [{"name": n, "shape": list(t.shape[1:])} for n, t in io.named_leaves(before, imported.output_names)]
    channels_after = {name: int(bn.num_features) for name, bn in bns}
    odd = [n for n, c in channels_after.items() if c % 8 and n in gamma0 and c != gamma0[n].numel()]
    if fmt == "onnx" and spec.prune.round_to == 1 and odd and p.target != "latency":
        rb.warn(f"{len(odd)} pruned layers keep channel counts that are not multiples of 8 (e.g. {odd[0]}: "
                f"{channels_after[odd[0]]}); onnxruntime on CPU can run such a model slower than the original "
                f"(bench/README.md: MobileNetV2 1.34× slower at 30%); set prune.round_to: \"auto\" (measured) or 8")
    if not_faster:
        rb.warn(not_faster)
    base, fin = rb.stages["baseline"], rb.stages["finetuned"]
    sparse_acc = rb.stages.get("sparse", {}).get("accuracy")
    removal = removal_cost(rb, culprits)
    if spec.task == "classification" and base["accuracy"] is not None and sparse_acc is not None \
            and sparse_acc < base["accuracy"] - 0.2:
        rb.warn(f"sparse training itself dropped accuracy from {base['accuracy']:.3f} to {sparse_acc:.3f} before "
                f"anything was removed: the penalty strength ({method.strength:g}) is too high for this "
                f"schedule (or sparse_training.lr is); lower method.strength")
    if spec.task == "classification" and base["accuracy"] is not None and fin["accuracy"] is not None \
            and fin["accuracy"] < base["accuracy"] - 0.05:
        rb.warn(f"accuracy dropped from {base['accuracy']:.3f} to {fin['accuracy']:.3f} after fine-tuning; "
                f"consider more fine-tuning epochs or a smaller amount")
    params_gone = 1 - fin["params"] / max(base["params"], 1)
    if p.target == "channels" and params_gone < 0.5 * p.achieved:
        rb.warn(f"{p.achieved:.0%} of prunable channels went but only {params_gone:.0%} of parameters: the global "
                f"|γ| ranking took them mostly from narrow layers; to shrink the model, use prune.target 'params'")
    rb.method.update(method.describe())
    reached = pilot.get("sparsity_reached")
    if reached is not None and reached < pilot["stop_at"]:
        rb.warn(f"the strength pilot aimed for {pilot['wanted_fraction']:.0%} of channels near zero after sparse "
                f"training and reached {reached:.0%}: removal cost more accuracy than it needed to; give more "
                f"sparse_training.epochs, more method.pilot_runs, or a method.strength")
    if control.get("used") and (control.get("near_zero_reached") or 0) < control["wanted_fraction"] - 0.05:
        rb.warn(f"the strength controller aimed for {control['wanted_fraction']:.0%} of channels near zero and "
                f"reached {control['near_zero_reached']:.0%} (final strength {control['final_strength']:g}): removal "
                f"cost more accuracy than it needed to; give more sparse_training.epochs or a method.strength")
    rb.extra.update({
        "format": {"in": imported.fmt, "out": fmt, "external_data": external, "bundle": bundle},
        "target": {"kind": p.target, "requested": p.requested, "achieved": round(p.achieved, 6)},
        "removed_channels": p.removed_channels,
        "output_deviation_relative": io.rel_error(after_, before),
        "output_deviation_per_output": per_output, "output_error_finetuned": final,
        "inputs": [{"name": n, "shape": list(s[1:])} for n, s in zip(imported.input_names, imported.input_shapes,
                                                                     strict=True)],
        "outputs": outputs, "output_structure": io.structure(before),
        "data": {"train": io.num_rows(data.x_train), "val": io.num_rows(data.x_val),
                 "val_source": data.val_source},
        "device": str(dev), "wall_seconds": round(time.perf_counter() - t_start, 3),
        "resumed_from": f"{ck['phase']}:{ck['epoch']}" if ck else None,
        "reinserted_bn": reinserted,
        "sparse_training_stopped_early_at": early.get("epoch"),
        "sparse_training_stopped_because": early.get("why"),
        "spec": spec.model_dump(mode="json"),  # every setting as run, defaults filled in
        "removal_cost": removal,
        "pilot": pilot, "strength_control": control, "latency": lat.report() if lat is not None else None,
        "finetune_distillation": kd.model_dump() if kd is not None else None,
        "not_pruned": gs.skipped, "output_layers": gs.output_layers,
        "prunable_bn_channels": {**gs.coverage,
                                 "share": round(gs.coverage["prunable"] / max(gs.coverage["total"], 1), 4)},
    })
    report = rb.build(threshold=p.threshold, layers=layer_table(gamma0, gamma1, channels_after, p.threshold),
                      model_bytes={"before": upload_bytes(model_path, [] if imported.meta["bundle"] else
                                                          imported.meta.get("onnx_external_data", [])),
                                   "after": written},
                      output_deviation=deviation)
    say("exporting", 1.0, {})
    return report


def _per_output(got: Any, want: Any, names: Any) -> dict[str, dict[str, float]]:
    """Per output (by name), how far ``got`` is from ``want`` on the same held-out inputs: the largest
    absolute change, that relative to the original's largest value, and the squared error relative to
    the original's power (the distillation error's measure)."""
    result = {}
    for (name, a), (_, b) in zip(io.named_leaves(got, names), io.named_leaves(want, names), strict=True):
        power = float(b.double().pow(2).sum())
        result[name] = {"max_abs": io.max_abs_diff(a, b), "relative": io.rel_error(a, b),
                        "relative_squared": float((a.double() - b.double()).pow(2).sum()) / power if power else 0.0}
    return result


def _check_fit(model: torch.nn.Module, data: Any, spec: JobSpec, imported: Imported) -> None:
    """Run two samples before anything else; classification needs one (batch, classes) output (the only
    output, or the only 2-d one among several: ``io.classifier_output``) wide enough for the labels."""
    try:
        with torch.no_grad():
            out = io.call(model.eval(), io.rows(data.x_train, slice(0, 2)))
    except Exception as e:
        shapes = ", ".join(str(tuple(t.shape[1:])) for t in io.args(data.x_train))
        raise SlimError(f"the data does not fit the model: running samples of shape {shapes} failed "
                        f"({str(e).splitlines()[0][:200]})") from None
    if spec.task == "classification" and data.y_train is not None:
        index, why = io.classifier_output(out, imported.output_names)
        if index is None:
            raise SlimError(why)
        classes = io.leaves(out)[index].shape[1]
        top = int(max(data.y_train.max(), data.y_val.max() if data.y_val is not None else 0))
        if top >= classes:
            raise SlimError(f"labels go up to {top} but the model outputs {classes} classes")
