"""Input-shape limits, checked before any importer allocates an example tensor.

Importers build a random example from the resolved input shape (declared in an ONNX or ``.pt2`` file, or
given as ``input_shape``). A file can declare anything: ``[1, 1, 2147483648, 2147483648]`` overflowed
torch's storage computation (a 500 in the service) and ``[1, 1, 20000, 20000]`` allocated 1.6 GB before
onnxruntime gave up. So the shape is checked here first, against an element limit and against
the per-sample shape of the data when the pipeline could read it without loading the data (an ``.npz``
array header). Importers call :func:`check_input_shapes` on the shapes they resolved; the pipeline sets
the data's sample shape around the import with :func:`data_sample_shape`, so importer signatures stay as
they are.
"""

from __future__ import annotations

import contextlib
import math
import os
import zipfile
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

from .errors import SlimError

#: Elements in one example tensor (batch included): 2**28 float32 values is 1 GiB.
DEFAULT_MAX_INPUT_ELEMENTS = 2**28
ENV = "SLIM_MAX_INPUT_ELEMENTS"

_data_shape: ContextVar[tuple[int, ...] | None] = ContextVar("slim_data_sample_shape", default=None)


def max_input_elements() -> int:
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_INPUT_ELEMENTS
    try:
        value = int(raw)
    except ValueError:
        raise SlimError(f"{ENV} must be an integer, got {raw!r}") from None
    if value < 1:
        raise SlimError(f"{ENV} must be at least 1, got {value}")
    return value


def size_problem(shape: list[int] | tuple[int, ...]) -> str | None:
    """Why a batch-first shape is too large for one example tensor, or None; pure arithmetic, nothing
    allocated. The batch counts: an importer's example has the file's static batch."""
    n, limit = math.prod(int(d) for d in shape), max_input_elements()
    if n > limit:
        return f"{n} elements ({' x '.join(str(int(d)) for d in shape)}), above the limit of {limit} ({ENV})"
    return None


def check_input_shapes(shapes: tuple[tuple[int, ...], ...], source: str) -> tuple[tuple[int, ...], ...]:
    """Raise SlimError unless every batch-first shape (``source`` says where they came from) is within the
    limit, and a single input agrees with the data's sample shape when known; returns ``shapes``."""
    for shape in shapes:
        too_big = size_problem(shape)
        if too_big:
            raise SlimError(f"{source} {list(shape)} has {too_big}; give a smaller input_shape if the model "
                            "accepts one", kind="input-too-large")
    data = _data_shape.get()
    if data is not None and len(shapes) == 1 and tuple(shapes[0][1:]) != data:
        raise SlimError(f"data samples have shape {data} but the model takes {tuple(shapes[0][1:])} ({source} "
                        f"{list(shapes[0])}); reshape the data or fix input_shape")
    return shapes


@contextlib.contextmanager
def data_sample_shape(shape: tuple[int, ...] | None) -> Iterator[None]:
    """Within this block, :func:`check_input_shapes` also compares with the data's sample shape."""
    token = _data_shape.set(shape)
    try:
        yield
    finally:
        _data_shape.reset(token)


def peek_npz_sample_shape(path: Path) -> tuple[int, ...] | None:
    """The per-sample shape of ``x`` in an ``.npz``, read from the array header only; None when it is not
    a readable single-input npz (the data loader then says what is wrong, after the import)."""
    if not str(path).lower().endswith(".npz"):
        return None
    import numpy as np  # here: the API imports this module through the spec and needs no numpy

    try:
        with zipfile.ZipFile(path) as z, z.open("x.npy") as f:
            version = np.lib.format.read_magic(f)
            header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)(f)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    shape = tuple(int(d) for d in header[0])
    return shape[1:] if len(shape) >= 2 else None
