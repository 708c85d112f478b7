"""Turn uploaded or registered data into what training reads, or say in one line what is wrong with it.

Readers by layout: ``.npz`` arrays (:mod:`.arrays`), ImageFolder trees and unlabeled image folders as a
directory, ``.zip``, ``.tar`` or ``.tar.gz`` (:mod:`.folders`), and WebDataset-style tar shards
(:mod:`.shards`). Large data stays on disk and is decoded on loader workers (:mod:`.samples`,
:mod:`.loaders`), so a worker's memory does not grow with the data set; every check still happens up
front, in one streaming pass, so a bad file fails the job before training and names the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import io
from ..errors import SlimError
from .arrays import load_npz
from .core import VAL_FRACTION, Dataset
from .folders import load_images
from .loaders import default_workers, make_loader
from .prep import IMAGE_EXTS, ArrayPrep, Normalise
from .samples import ArraySamples, Progress
from .shards import load_shards, shard_files
from .stores import TarStore, open_store

__all__ = ["Dataset", "IMAGE_EXTS", "SUPPORTED", "TASKS", "VAL_FRACTION", "load_dataset", "make_loader"]

TASKS = ("classification", "distillation")
SUPPORTED = ".npz, .zip, .tar.gz, .tgz or .tar, or a folder"
_DATA_FILES = (".npz", ".zip", ".tar.gz", ".tgz", ".tar")


def load_dataset(path: Path, *, task: str, input_shape: Any, seed: int = 0,
                 workdir: Path | None = None, options: Any = None,
                 progress: Progress | None = None) -> Dataset:
    """Load and validate a data file or folder; raises SlimError so bad data fails before any training.

    ``input_shape`` is batch-first (as in the job spec), one shape or a tuple of shapes (one per model
    input); only the per-sample part is compared. ``options`` is the spec's ``data`` block (None: the
    defaults). ``workdir`` is unused since archives are read in place (kept for callers).
    """
    ds = _load(path, task=task, input_shape=input_shape, seed=seed, workdir=workdir, options=options,
               progress=progress)
    lazy = isinstance(ds.x_train, io.LazyInputs) or isinstance(ds.x_val, io.LazyInputs)
    ds.workers = default_workers(getattr(options, "workers", None)) if lazy else 0
    return ds


def _load(path: Path, *, task: str, input_shape: Any, seed: int = 0,
          workdir: Path | None = None, options: Any = None, progress: Progress | None = None) -> Dataset:
    del workdir
    if task not in TASKS:
        raise SlimError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    path = Path(path)
    if not path.exists():
        raise SlimError(f"data {path.name!r} does not exist")
    shapes = io.as_shapes(input_shape)
    shape = shapes[0] if shapes is not None else None
    name = path.name.lower()
    workers = default_workers(getattr(options, "workers", None))
    if path.is_file() and name.endswith(".npz"):
        return _arrays(load_npz(path, task, shapes, seed, workers), options, workers)
    if shapes is not None and len(shapes) > 1:
        raise SlimError(f"the model takes {len(shapes)} inputs; image data feeds one, so upload an .npz with "
                        f"arrays {', '.join(f'x{i}' for i in range(len(shapes)))}")
    if path.is_dir():
        shards = shard_files(path)
        if shards and not any(p.is_dir() for p in path.iterdir() if not p.name.startswith(".")):
            return load_shards(shards, task, shape, seed, options, workers, progress)
        inner = [p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(_DATA_FILES)]
        if len(inner) == 1 and len(list(path.iterdir())) == 1:  # a folder holding one data file
            return _load(inner[0], task=task, input_shape=input_shape, seed=seed, options=options,
                         progress=progress)
        return load_images(open_store(path), task, shape, seed, options, workers, progress)
    if not name.endswith((".zip", ".tar.gz", ".tgz", ".tar")):
        raise SlimError(f"unsupported data file {path.name!r}; upload {SUPPORTED} "
                        "(npz with arrays x and y, or an archive of train/<class>/<image>)")
    store = open_store(path)
    if isinstance(store, TarStore) and _looks_like_shard(store):
        return load_shards([path], task, shape, seed, options, workers, progress)
    return load_images(store, task, shape, seed, options, workers, progress)


def _looks_like_shard(store: TarStore) -> bool:
    """A tar of ``<key>.<ext>`` samples with ``.cls`` labels, rather than an ImageFolder tree."""
    names = [store.names[i] for i in range(min(len(store.names), 64))]
    return any(n.endswith(".cls") for n in names) and not any(n.split("/")[0] == "train" for n in names)


def _arrays(ds: Dataset, options: Any, workers: int) -> Dataset:
    """npz data as uploaded unless the spec asks for normalisation or augmentation: normalisation is done
    once in memory; augmentation makes the training part lazy so each epoch sees new crops."""
    sized = [f for f in ("resize", "crop") if getattr(options, f, None) is not None]
    if sized:  # silently training on arrays the spec asked to resize would be a wrong result
        raise SlimError(f"data.{sized[0]} applies to image files; .npz arrays are used at their own size "
                        f"(resize them before saving, or upload the images)")
    augment = getattr(options, "augment", "none") != "none"
    normalise = getattr(options, "mean", None) is not None
    if not (augment or normalise):
        return ds
    if isinstance(ds.x_train, ArraySamples):  # memory-mapped: the same rows, prepared the spec's way
        ds.x_train.preps = [ArrayPrep(tuple(a.shape[1:]), options) for a in ds.x_train.arrays]
        if isinstance(ds.x_val, ArraySamples):
            plain = options.model_copy(update={"augment": "none"})
            ds.x_val.preps = [ArrayPrep(tuple(a.shape[1:]), plain) for a in ds.x_val.arrays]
            return ds
        norms = [Normalise(options, a.shape[1]) for a in ds.x_train.arrays]
        ds.x_val = io.pack([_normalised(t, n) for t, n in zip(io.args(ds.x_val), norms, strict=True)])
        return ds
    xs = io.args(ds.x_train)
    preps = [ArrayPrep(tuple(t.shape[1:]), options) for t in xs]
    if normalise:
        norms = [Normalise(options, t.shape[1]) for t in xs]
        ds.x_val = io.pack([_normalised(t, n) for t, n in zip(io.args(ds.x_val), norms, strict=True)])
        if not augment:
            ds.x_train = io.pack([_normalised(t, n) for t, n in zip(xs, norms, strict=True)])
            return ds
    ds.x_train = ArraySamples(xs, preps, workers)
    ds.source = "lazy"
    return ds


def _normalised(t: torch.Tensor, norm: Normalise) -> torch.Tensor:
    if t.dim() < 2:
        return t
    shape = (1, -1, *([1] * (t.dim() - 2)))
    return (t - norm.mean.view(shape)) / norm.std.view(shape)  # type: ignore[union-attr]

