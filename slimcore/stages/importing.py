"""The first stages, all in the ``importing`` phase: ``import`` (lift the model, read the data, check they fit),
``calibrate`` (ONNX: BatchNorm re-inserted; the original kept as reference and teacher) and ``coupling``
(channel groups).

None of them has outputs for a checkpoint: a lifted graph is code, and checkpoints hold only data
(``weights_only``). So on resume they simply run again; they are deterministic, and every later stage's
outputs are restored onto what they rebuild (the re-inserted BatchNorms included, which is why
``calibrate`` must run before any state is loaded).
"""

from __future__ import annotations

import copy
import importlib
from pathlib import Path
from typing import Any

import torch

from .. import io
from ..data import load_dataset
from ..errors import SlimError
from ..export import EXPORTERS
from ..external_data import open_model
from ..formats import detect_format
from ..groups import all_bns, build_groups
from ..lift import IMPORTERS, Imported
from ..shape_limits import data_sample_shape, peek_npz_sample_shape
from ..spec import JobSpec
from ..train import device_of
from .state import STAGES, JobState, Resume, Stage


def load_plugins() -> None:
    """Importers and exporters register themselves on import. TorchScript and .pt2 load now; ONNX's load on
    first use (``Registry.lazy``: ``import onnx`` alone costs 1.5 s, paid by every job in a fresh worker)."""
    for mod in ("slimcore.lift.torchscript", "slimcore.lift.exported", "slimcore.export.pt2",
                "slimcore.export.torchscript"):
        importlib.import_module(mod)
    IMPORTERS.lazy("onnx", "slimcore.lift.onnx_import")
    EXPORTERS.lazy("onnx", "slimcore.export.onnx")


def import_model(path: Path, spec: JobSpec, workdir: Path | None = None,
                 sample_shape: tuple[int, ...] | None = None) -> Imported:
    """Lift the upload: a model file, a folder holding one ``.onnx`` with its data files, or a bundle of
    them (extracted under ``workdir``); ``meta["bundle"]`` and ``meta["model_file"]`` say which it was.

    ``sample_shape``: one sample of the data (an ``.npz``'s ``x`` without its first axis). A TorchScript
    file records no input shape, and a user who uploads ``x`` of shape (N, 1, 128) has already said it: with
    no ``input_shape`` in the spec the import takes (1, *sample_shape) rather than refusing the job (the
    first thing a new user with a traced 1-D CNN met). ``meta["input_shape_from"]`` says where the shape
    came from (spec, data or the model file), for the report."""
    load_plugins()
    source = open_model(path, workdir)
    fmt = detect_format(source.path)
    if fmt not in IMPORTERS:
        raise SlimError(f"{fmt} models are not supported yet (supported: {', '.join(IMPORTERS.names())})")
    shapes = spec.shapes()
    given: Any = shapes[0] if shapes and len(shapes) == 1 else shapes
    origin = "spec" if shapes else "model"
    if not shapes and fmt == "torchscript" and sample_shape:
        given, origin = (1, *sample_shape), "data"
    imported = IMPORTERS.get(fmt)(source.path, given)
    imported.meta.update(bundle=source.bundle, model_file=source.path.name, input_shape_from=origin)
    return imported


@STAGES.register("import")
class Import(Stage):
    def run(self, job: JobState, resume: Resume | None) -> None:
        spec = job.spec
        job.say("importing", 0.1, {"step": "lifting the model graph"})
        sample = peek_npz_sample_shape(job.data_path)
        with data_sample_shape(sample):  # checked before the importer allocates
            job.imported = imported = import_model(job.model_path, spec, job.workdir, sample)
        job.model = imported.module
        job.say("importing", 0.4, {"step": "reading the data"})
        def checked(done: int, total: int) -> None:  # the streaming check pass of a large data set
            job.say("importing", 0.4 + 0.35 * done / max(total, 1), {"step": "checking the data", "checked": done,
                                                                     "of": total})

        job.data = data = load_dataset(job.data_path, task=spec.task, input_shape=imported.input_shapes,
                                       seed=spec.seed, workdir=job.workdir, options=spec.data, progress=checked)
        job.example = io.apply(io.rows(data.x_train, slice(0, 2)), torch.clone)
        check_fit(job.model, data, spec, imported)
        job.out_fmt = imported.fmt if spec.export.format == "same" else spec.export.format
        job.calib = io.batches(io.rows(data.x_train, slice(0, 512)), 128)
        job.dev = device_of(job.device)


@STAGES.register("calibrate")
class Calibrate(Stage):
    def run(self, job: JobState, resume: Resume | None) -> None:
        job.reinserted = []
        if job.imported.fmt == "onnx":
            # Exporters fold BatchNorm into Conv: give those convs a γ again (function unchanged at the start;
            # folded back at export). Before any checkpoint is restored: the saved state includes these BNs.
            from ..lift.bn_insert import reinsert_bn

            job.reinserted = reinsert_bn(job.model, job.calib)
        job.teacher = copy.deepcopy(job.model).eval() if job.spec.task == "distillation" else None
        job.reference = copy.deepcopy(job.model).eval()


@STAGES.register("coupling")
class Coupling(Stage):
    def run(self, job: JobState, resume: Resume | None) -> None:
        job.say("importing", 0.8, {"step": "analysing channel coupling"})
        job.gs = build_groups(job.model, job.example, job.spec.prune.ignore, job.imported.meta.get("unprunable"))
        job.say("importing", 1.0, {"step": "channel groups found", "groups": len(job.gs.groups)})
        job.bns = all_bns(job.model)
        for root, why in job.gs.skipped.items():
            job.rb.warn(f"layer {root} is not pruned: {why}")


def check_fit(model: torch.nn.Module, data: Any, spec: JobSpec, imported: Imported) -> None:
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
