"""The data set every job trains on: a training part and a held-out part, in memory or decoded lazily.

Pruning quality is judged on held-out data, so every data set leaves the readers with a validation part and
a record of where it came from (``val_source``); silently training and evaluating on the same samples would
make a bad prune look good.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import io
from ..errors import SlimError

VAL_FRACTION = 0.2


@dataclass
class Dataset:
    """Training and evaluation inputs, ready for a model that takes them.

    ``x_*`` is a tensor, a tuple of tensors (several model inputs, npz ``x0``, ``x1``, …), or
    :class:`~slimcore.io.LazyInputs` when the data set is too large to hold in memory or is augmented per
    epoch (then samples are decoded on loader workers; :mod:`slimcore.io` helpers accept every form).
    ``y_*`` (labels, one int64 per sample: small even for a million images) and ``num_classes`` are None
    for distillation, where the teacher model supplies the targets. ``classes`` maps label index to folder
    name for ImageFolder data (None for npz). ``source`` (``memory`` or ``lazy``) and ``workers`` say how it
    is read (the report's ``data``).
    """

    x_train: io.Inputs
    y_train: torch.Tensor | None
    x_val: io.Inputs
    y_val: torch.Tensor | None
    num_classes: int | None
    val_source: str
    classes: list[str] | None
    source: str = "memory"
    workers: int = 0  # loader processes decoding lazy samples (0: in memory, or decoded in this process)


def split(x: io.Inputs, y: torch.Tensor | None, seed: int, classes: list[str] | None) -> Dataset:
    """Hold out a seeded random 20% so reruns of a job evaluate on the same samples."""
    n = io.num_rows(x)
    if n < 2:
        raise SlimError(f"the data set has {n} sample; at least 2 are needed to hold one out for evaluation")
    n_val = max(1, int(n * VAL_FRACTION))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val, train = perm[:n_val].sort().values, perm[n_val:].sort().values
    if isinstance(x, io.LazyInputs):
        x_train, x_val = x.subset(train), x.subset(val)  # type: ignore[attr-defined]
    else:
        x_train, x_val = io.rows(x, train), io.rows(x, val)
    return finish(x_train, None if y is None else y[train], x_val, None if y is None else y[val],
                  f"split:{VAL_FRACTION}", classes)


def finish(x: io.Inputs, y: torch.Tensor | None, x_val: io.Inputs, y_val: torch.Tensor | None,
           val_source: str, classes: list[str] | None) -> Dataset:
    if io.num_rows(x) < 2 and val_source != f"split:{VAL_FRACTION}":
        raise SlimError(f"the training data has {io.num_rows(x)} sample; at least 2 are needed")
    num_classes = None
    if y is not None and y_val is not None:
        num_classes = len(classes) if classes else int(max(int(y.max()), int(y_val.max()))) + 1
    return Dataset(x, y, x_val, y_val, num_classes, val_source, classes)
