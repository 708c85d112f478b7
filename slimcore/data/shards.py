"""WebDataset-style tar shards: many ``.tar`` files, each holding samples as ``<key>.<image ext>`` with the
label in ``<key>.cls`` (a decimal class index), the layout ``webdataset``/``tarp`` write.

Shards are indexed once (tar headers only: a shard is never unpacked) and read in place, so a sample is one
``pread``. Shards whose file name marks them as validation (``val``/``valid``/``validation`` as a word,
e.g. ``imagenet-val-000.tar``) are the held-out part; without any, a seeded 20% is held out.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import SlimError
from .core import Dataset, finish, split
from .folders import _ready
from .prep import IMAGE_EXTS, ImagePrep
from .samples import ImageSamples, Progress
from .stores import Names, Store, TarStore

_VAL = re.compile(r"(^|[-_.])(val|valid|validation)([-_.]|$)", re.IGNORECASE)


class ConcatStore(Store):
    """Several stores as one index space (every shard's members, shard after shard)."""

    def __init__(self, stores: Sequence[Store]) -> None:
        self.stores = list(stores)
        self.starts = np.cumsum([0] + [len(s.names) for s in self.stores])
        self.names = Names([f"{s.label}/{n}" for s in self.stores for n in s.names])
        self.label = ", ".join(s.label for s in self.stores[:3]) + (" …" if len(self.stores) > 3 else "")

    def read(self, i: int) -> bytes:
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.stores[k].read(i - int(self.starts[k]))


def shard_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(".tar")
                  and not p.name.startswith("."))


def _index(store: ConcatStore, labelled: bool) -> tuple[list[int], list[int]]:
    """Store indices of each sample's image and its label, keys grouped across a shard's members."""
    images: dict[str, int] = {}
    labels: dict[str, int] = {}
    for i, name in enumerate(store.names):
        base = name.rsplit("/", 1)
        stem, dot, ext = base[-1].partition(".")
        key = (base[0] + "/" if len(base) > 1 else "") + stem
        if not dot:
            continue
        if "." + ext.lower() in IMAGE_EXTS:
            if key in images:
                raise SlimError(f"sample {key!r} has two images; one image per key")
            images[key] = i
        elif ext.lower() == "cls" and labelled:
            text = store.read(i).decode(errors="replace").strip()
            if not text.isdigit():
                raise SlimError(f"label file '{name}.cls' holds {text[:20]!r}, not a class index (0, 1, …)")
            labels[key] = int(text)
    if not images:
        raise SlimError(f"the shards ({store.label}) hold no images ({', '.join(sorted(IMAGE_EXTS))})")
    keys = sorted(images)
    if labelled:
        missing = [k for k in keys if k not in labels]
        if missing:
            raise SlimError(f"sample {missing[0]!r} has an image but no .cls label ({len(missing)} such); "
                            "classification needs <key>.cls beside each image")
    return [images[k] for k in keys], [labels[k] for k in keys] if labelled else []


def load_shards(shards: list[Path], task: str, shape: tuple[int, ...] | None, seed: int, options: Any,
                workers: int, progress: Progress | None = None) -> Dataset:
    if shape is None or len(shape) != 4 or shape[1] not in (1, 3):
        got = "none" if shape is None else list(shape)
        raise SlimError(f"image shards need input_shape [N, C, H, W] with C=1 or 3; got {got}")
    labelled = task == "classification"
    prep = ImagePrep(shape, options)
    val = [p for p in shards if _VAL.search(p.stem)]
    train = [p for p in shards if p not in val]
    if not train:
        raise SlimError("every shard is named as validation (val); training needs shards without 'val' in the name")

    def part(paths: list[Path], opts: Any) -> tuple[Any, torch.Tensor | None]:
        store = ConcatStore([TarStore(p) for p in paths])
        files, labels = _index(store, labelled)
        x = _ready(ImageSamples(store, np.array(files), prep, workers), prep, opts, progress)
        return x, torch.tensor(labels, dtype=torch.int64) if labelled else None

    x, y = part(train, options)
    if not val:
        ds = split(x, y, seed, None)
    else:
        xv, yv = part(val, None)
        ds = finish(x, y, xv, yv, "val shards", None)
    ds.source = "lazy" if isinstance(x, ImageSamples) else "memory"
    return ds
