"""ImageFolder data (``train/<class>/<image>``, optionally ``val/<class>/<image>``) and, for distillation,
one folder of unlabeled images — from a directory or an archive read in place (:mod:`.stores`).

The layout is worked out from file names alone, so a million-image tree is listed, not opened. Small data
sets (under ``SLIM_DATA_IN_MEMORY_MB`` once decoded, 128 by default, and not augmented) are decoded once into
memory as before; larger ones stay lazy (:class:`~.samples.ImageSamples`) after a streaming check pass.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import torch

from ..errors import SlimError
from .core import Dataset, finish, split
from .prep import IMAGE_EXTS, ImagePrep
from .samples import ImageSamples, Progress, check_all, materialise
from .stores import Store

IN_MEMORY_ENV = "SLIM_DATA_IN_MEMORY_MB"
# Archive tools (macOS Finder especially) add these; they are never part of the data set.
_JUNK_DIRS = frozenset({"__MACOSX"})


def in_memory_limit() -> int:
    raw = os.environ.get(IN_MEMORY_ENV, "").strip()
    return (int(raw) if raw.isdigit() else 128) * 1024**2


def _visible(parts: tuple[str, ...]) -> bool:
    """Hidden entries (``.DS_Store``, macOS ``._x.png`` resource forks) look like images but are not."""
    return all(not p.startswith(".") and p not in _JUNK_DIRS for p in parts)


def _is_image(parts: tuple[str, ...]) -> bool:
    return PurePosixPath(parts[-1]).suffix.lower() in IMAGE_EXTS


def _entries(store: Store) -> list[tuple[tuple[str, ...], int]]:
    return [(parts, i) for i, name in enumerate(store.names)
            if _visible(parts := tuple(p for p in name.split("/") if p))]


def _root(entries: list[tuple[tuple[str, ...], int]]) -> tuple[str, ...] | None:
    """``train/`` at the top or inside one wrapper folder (as zipping a folder usually produces)."""
    if any(len(p) > 1 and p[0] == "train" for p, _ in entries):
        return ()
    tops = {p[0] for p, _ in entries}
    if len(tops) == 1:
        top = next(iter(tops))
        if any(len(p) > 2 and p[1] == "train" for p, _ in entries):
            return (top,)
    return None


def _flat(entries: list[tuple[tuple[str, ...], int]]) -> tuple[int, list[int]] | None:
    """Images in one folder (at the top or in one wrapper), nothing in subfolders: what a detection or
    segmentation user has. Only for distillation; None when the layout is not that."""
    depth = {len(p) for p, _ in entries}
    if depth == {1}:
        strip = 0
    elif depth == {2} and len({p[0] for p, _ in entries}) == 1:
        strip = 1
    else:
        return None
    files = [i for p, i in entries if _is_image(p)]
    return (strip, files) if files else None


def _split_files(entries: list[tuple[tuple[str, ...], int]], root: tuple[str, ...], split_name: str,
                 classes: list[str] | None) -> tuple[list[str], list[int], list[int]]:
    """(class names, store indices, labels) of ``<root>/<split>/<class>/…`` in name order."""
    k = len(root)
    by_class: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for parts, i in entries:
        if parts[:k] != root or len(parts) <= k + 1 or parts[k] != split_name:
            continue
        rest = parts[k + 1:]
        if len(rest) == 1:
            if _is_image(rest):
                raise SlimError(f"image '{split_name}/{rest[0]}' is not inside a class folder; "
                                f"move images into {split_name}/<class>/")
            continue
        by_class[rest[0]].append(("/".join(rest), i if _is_image(rest) else -1))
    names = sorted(by_class)
    if not names:
        raise SlimError(f"{split_name}/ has no class folders; lay it out as {split_name}/<class>/<image>")
    if classes is not None:
        unknown = sorted(set(names) - set(classes))
        if unknown:
            raise SlimError(f"{split_name}/ has class folder {unknown[0]!r} that train/ does not have "
                            f"(train classes: {', '.join(classes)}); val must use train's classes")
    index = {c: n for n, c in enumerate(classes if classes is not None else names)}
    files: list[int] = []
    labels: list[int] = []
    for name in names:
        found = [i for _, i in sorted(by_class[name]) if i >= 0]
        if not found:
            raise SlimError(f"class folder '{split_name}/{name}' has no images "
                            f"({', '.join(sorted(IMAGE_EXTS))}); add some or remove the folder")
        files += found
        labels += [index[name]] * len(found)
    return names, files, labels


def load_images(store: Store, task: str, shape: tuple[int, ...] | None, seed: int, options: Any,
                workers: int, progress: Progress | None = None) -> Dataset:
    if shape is None or len(shape) != 4 or shape[1] not in (1, 3):
        got = "none" if shape is None else list(shape)
        raise SlimError(f"image data needs input_shape [N, C, H, W] with C=1 (grayscale) or 3 (RGB) "
                        f"to size the images; got {got}")
    prep = ImagePrep(shape, options)
    entries = _entries(store)
    labelled = task == "classification"
    root = _root(entries)
    if root is None:
        flat = None if labelled else _flat(entries)
        if flat is None:
            tops = sorted({p[0] + ("/" if len(p) > 1 else "") for p, _ in entries})
            raise SlimError(f"{store.label!r} has no train/ folder (top level holds: "
                            f"{', '.join(tops[:5]) or 'nothing'}); lay it out as train/<class>/<image> and "
                            "optionally val/<class>/<image>")
        strip, files = flat
        top = len(store.names[files[0]].split("/")[0]) + 1 if strip else 0
        x = _ready(ImageSamples(store, np.array(files), prep, workers, top), prep, options, progress)
        return _sourced(split(x, None, seed, None), x)
    strip = sum(len(p) + 1 for p in root)
    classes, files, labels = _split_files(entries, root, "train", None)
    x = _ready(ImageSamples(store, np.array(files), prep, workers, strip), prep, options, progress)
    y = torch.tensor(labels, dtype=torch.int64) if labelled else None
    has_val = any(p[:len(root)] == root and len(p) > len(root) + 2 and p[len(root)] == "val" for p, _ in entries)
    if not has_val:
        return _sourced(split(x, y, seed, classes if labelled else None), x)
    _, vfiles, vlabels = _split_files(entries, root, "val", classes)
    xv = _ready(ImageSamples(store, np.array(vfiles), prep, workers, strip), prep, None, progress)
    yv = torch.tensor(vlabels, dtype=torch.int64) if labelled else None
    return _sourced(finish(x, y, xv, yv, "val/", classes if labelled else None), x)


def _ready(samples: ImageSamples, prep: ImagePrep, options: Any, progress: Progress | None) -> Any:
    """Small and not augmented: decoded into memory once. Otherwise checked in one streaming pass and
    kept lazy."""
    augment = getattr(options, "augment", "none") != "none"
    shape = (prep.c, prep.h, prep.w)
    if not augment and len(samples) * int(np.prod(shape)) * 4 <= in_memory_limit():
        return materialise(samples, shape, "images", progress)
    check_all(samples, "images", progress)
    return samples


def _sourced(ds: Dataset, x: Any) -> Dataset:
    ds.source = "lazy" if isinstance(x, ImageSamples) else "memory"
    return ds
