"""Batches for training and evaluation, from tensors in memory or from lazily decoded samples.

In-memory data is sliced a whole batch at a time (far faster on CPU than stacking samples one by one).
Lazy data (:class:`~slimcore.data.samples.Samples`) is decoded on DataLoader worker processes with pinned
memory on CUDA, persistent workers and prefetching, so the accelerator is not what waits.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

from .. import io
from ..errors import SlimError

WORKERS_ENV = "SLIM_DATA_WORKERS"


def default_workers(asked: int | None = None) -> int:
    """Loader processes: the spec's ``data.workers``, else ``SLIM_DATA_WORKERS``, else every core but one
    (at most 8). A daemonic process (some process pools run tasks in one) may not start children, so it
    decodes in the training process instead of failing."""
    if multiprocessing.current_process().daemon:
        return 0
    if asked is not None:
        return asked
    raw = os.environ.get(WORKERS_ENV, "").strip()
    if raw.isdigit():
        return int(raw)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores - 1))


def make_loader(x: io.Inputs, y: torch.Tensor | None, batch_size: int, *, shuffle: bool, seed: int,
                pin_memory: bool = False, index: bool = False) -> DataLoader:
    """Batches for training (``shuffle=True``: lazy samples get the training augmentation) or evaluation,
    reproducible from ``seed``.

    Each batch is a list ``[x, y]``, or ``[x]`` when ``y`` is None (distillation), so ``batch[0]`` is always
    the inputs: a tensor, or a tuple of tensors when ``x`` is one (several model inputs); ``index=True``
    (in-memory data only) appends the batch's row indices, by which fine-tuning looks up cached teacher
    outputs. In-memory batches
    are sliced in one indexing operation, which is why ``loader.batch_size`` is None; use ``len(loader)``.
    With ``shuffle=True`` a trailing batch of a single sample is dropped (each epoch drops a different one),
    because BatchNorm cannot compute batch statistics from one sample and would raise mid-training.
    """
    if batch_size < 1:
        raise SlimError(f"batch_size must be at least 1, got {batch_size}")
    n = io.num_rows(x)
    sampler = _Batches(n, batch_size, shuffle=shuffle, seed=seed)
    if isinstance(x, io.LazyInputs):
        workers = x.workers  # type: ignore[attr-defined]
        view = _Labelled(x, y, train=shuffle)
        return DataLoader(view, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                          pin_memory=pin_memory, persistent_workers=workers > 0,
                          prefetch_factor=4 if workers > 0 else None,
                          generator=torch.Generator().manual_seed(seed))
    if isinstance(x, torch.Tensor):
        dataset: Any = TensorDataset(x) if y is None else TensorDataset(x, y)
    else:
        dataset = _MultiInput(tuple(x), y)
    if index:
        dataset = _Indexed(dataset)
    return DataLoader(dataset, sampler=sampler, batch_size=None, pin_memory=pin_memory)


def collate(items: list[Any]) -> list[Any]:
    """Stack samples ``(inputs, label)`` or ``(inputs,)`` into ``[inputs, labels]``, keeping a model's
    several inputs a tuple (the default collate would turn them into a list)."""
    first = items[0][0]
    if isinstance(first, torch.Tensor):
        xs: Any = torch.stack([it[0] for it in items])
    else:
        xs = tuple(torch.stack([it[0][k] for it in items]) for k in range(len(first)))
    if len(items[0]) == 1:
        return [xs]
    return [xs, torch.as_tensor([int(it[1]) for it in items], dtype=torch.int64)]


class _Labelled(torch.utils.data.Dataset):
    """A lazy sample with its label; ``train`` picks the augmented decoding."""

    def __init__(self, x: Any, y: torch.Tensor | None, *, train: bool) -> None:
        self.x, self.y, self.train = x, y, train

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        sample = self.x.sample(index, train=self.train)
        return (sample,) if self.y is None else (sample, self.y[index])

    def __len__(self) -> int:
        return len(self.x)


class _MultiInput(torch.utils.data.Dataset):
    """Like TensorDataset, but the inputs of one row stay together as a tuple: ``[(x0, x1, …), y]``."""

    def __init__(self, xs: tuple[torch.Tensor, ...], y: torch.Tensor | None) -> None:
        self.xs, self.y = xs, y

    def __getitem__(self, index: Any) -> list[Any]:
        row: list[Any] = [tuple(t[index] for t in self.xs)]
        return row if self.y is None else [*row, self.y[index]]

    def __len__(self) -> int:
        return int(self.xs[0].shape[0])


class _Indexed(torch.utils.data.Dataset):
    """A batch of another in-memory dataset with its row indices last: ``[x, (y,) indices]``."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getitem__(self, index: Any) -> list[Any]:
        return [*self.inner[index], torch.as_tensor(index, dtype=torch.int64)]

    def __len__(self) -> int:
        return len(self.inner)


class _Batches(Sampler[list[int]]):
    """Index lists for whole batches; the generator persists so successive epochs get fresh orders."""

    def __init__(self, n: int, batch_size: int, *, shuffle: bool, seed: int) -> None:
        self.n, self.batch_size, self.shuffle = n, batch_size, shuffle
        self.generator = torch.Generator().manual_seed(seed)
        self.drop_single = shuffle and batch_size > 1 and n > 1 and n % batch_size == 1

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.n, generator=self.generator) if self.shuffle else torch.arange(self.n)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield order[start:start + self.batch_size].tolist()

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (1 if rest and not self.drop_single else 0)

