"""Lazily decoded samples (:class:`~slimcore.io.LazyInputs`): image files in a store, or rows of arrays
too large for memory. Memory stays flat in the data set's size: a sample set is a store, an int64 array
of positions and the preparation, and only the batches in flight are decoded.

Also the two passes over every sample that a job makes before training: the up-front check (a bad file
fails the job before any training, naming the file) and, for small data sets, decoding everything into
memory once (in-memory batches are many times faster than decoding every epoch).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from .. import io
from ..errors import SlimError
from .loaders import _Labelled, collate
from .prep import ArrayPrep, ImagePrep
from .stores import Store

log = logging.getLogger("slimcore.data")
Progress = Callable[[int, int], None]


class Samples(io.LazyInputs):
    """Positions into something readable; ``sample(i, train)`` decodes one."""

    def __init__(self, positions: np.ndarray, rank: int, workers: int) -> None:
        self.positions, self.rank, self.workers = positions.astype(np.int64), rank, workers

    def __len__(self) -> int:
        return len(self.positions)

    def sample(self, i: int, *, train: bool) -> io.Inputs:
        raise NotImplementedError

    def name(self, i: int) -> str:
        return f"sample {int(self.positions[i])}"

    def subset(self, index: Any) -> Samples:
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.positions = self.positions[np.asarray(index, dtype=np.int64)]
        return clone

    def take(self, positions: Sequence[int]) -> io.Inputs:
        return collate([(self.sample(int(p), train=False),) for p in positions])[0]

    def batches(self, size: int) -> Iterator[io.Inputs]:
        workers = self.workers if len(self) > size else 0
        loader = DataLoader(_Labelled(self, None, train=False), batch_size=size, num_workers=workers,
                            collate_fn=collate, prefetch_factor=4 if workers else None)
        return (batch[0] for batch in loader)


class ImageSamples(Samples):
    def __init__(self, store: Store, files: np.ndarray, prep: ImagePrep, workers: int, strip: int = 0) -> None:
        super().__init__(np.asarray(files), 4, workers)
        self.store, self.prep, self.strip = store, prep, strip

    def name(self, i: int) -> str:
        return self.store.names[int(self.positions[i])][self.strip:]

    def sample(self, i: int, *, train: bool) -> torch.Tensor:
        return self.prep(self.store.read(int(self.positions[i])), lambda: self.name(i), train=train)


class ArraySamples(Samples):
    """Rows of arrays (memory-mapped or in memory): several arrays for several model inputs."""

    def __init__(self, arrays: Sequence[Any], preps: Sequence[ArrayPrep], workers: int) -> None:
        super().__init__(np.arange(len(arrays[0])), len(arrays[0].shape), workers)
        self.arrays, self.preps = list(arrays), list(preps)

    def sample(self, i: int, *, train: bool) -> io.Inputs:
        row = int(self.positions[i])
        xs = [p(_as_float(a[row]), train=train) for a, p in zip(self.arrays, self.preps, strict=True)]
        return io.pack(xs)


def _as_float(a: Any) -> torch.Tensor:
    """uint8 is 0–255 pixels (the npz convention); everything else is taken as it is, in float32."""
    if isinstance(a, torch.Tensor):
        return a.float()
    arr = np.asarray(a)
    if arr.dtype == np.uint8:
        return torch.from_numpy(arr.astype(np.float32) / np.float32(255))
    return torch.from_numpy(np.array(arr, dtype=np.float32))


class _Decode(torch.utils.data.Dataset):
    """One sample decoded the evaluation way, with the problem as text (``(None, message)``), so a loader
    worker's error reaches the job as its own one-line message, not as a wrapped worker traceback.
    ``keep=False`` (the check pass) sends back no pixels."""

    def __init__(self, samples: Samples, keep: bool) -> None:
        self.samples, self.keep = samples, keep

    def __getitem__(self, i: int) -> tuple[Any, str]:
        try:
            x = self.samples.sample(i, train=False)
            return (x if self.keep else None), ""
        except SlimError as err:
            return None, str(err)

    def __len__(self) -> int:
        return len(self.samples)


def _decoded(samples: Samples, keep: bool, what: str, progress: Progress | None) -> Iterator[list[Any]]:
    """Every sample once, in order, in lists of 64; the first unreadable one fails the job by name. A
    progress line goes to the log every 10 s (and to ``progress(done, total)``)."""
    total, done, last = len(samples), 0, time.monotonic()
    workers = samples.workers if total > 256 else 0
    loader = DataLoader(_Decode(samples, keep), batch_size=64, num_workers=workers, collate_fn=list,
                        prefetch_factor=4 if workers else None)
    for items in loader:
        bad = next((msg for _, msg in items if msg), None)
        if bad:
            raise SlimError(bad)
        yield [x for x, _ in items]
        done += len(items)
        if time.monotonic() - last > 10:
            last = time.monotonic()
            log.info("checked %d of %d %s", done, total, what)
            if progress is not None:
                progress(done, total)


def check_all(samples: Samples, what: str, progress: Progress | None = None) -> None:
    """Decode every sample once before training (nothing is kept): a bad file fails before training."""
    for _ in _decoded(samples, False, what, progress):
        pass


def materialise(samples: Samples, sample_shape: tuple[int, ...], what: str,
                progress: Progress | None = None) -> torch.Tensor:
    """Decode every sample into one preallocated tensor: the check and the in-memory copy in one pass,
    with peak memory at 1× the result."""
    out = torch.empty((len(samples), *sample_shape), dtype=torch.float32)
    at = 0
    for xs in _decoded(samples, True, what, progress):
        for x in xs:
            if tuple(x.shape) != tuple(sample_shape):
                raise SlimError(f"{samples.name(at)!r} decodes to shape {tuple(x.shape)}, not {sample_shape}")
            out[at] = x
            at += 1
    return out
