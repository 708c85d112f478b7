""".npz data: arrays ``x`` (or ``x0``, ``x1``, … for several inputs), labels ``y``, optional ``*_val``.

All checks happen up front: a job that fails an hour into training because of one NaN or a mislabelled
array wastes the user's time and ours. Arrays are vetted against their zip headers before numpy allocates
anything (an npz is a zip, and its headers are user input).
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from .. import io
from ..archive import MAX_BYTES_ENV, default_max_bytes
from ..errors import SlimError
from .core import Dataset, finish, split

# --- npz ----------------------------------------------------------------------------------------------


def _vet_npz(path: Path) -> None:
    """An npz is a zip too: bound what it inflates to before numpy allocates arrays from its headers."""
    limit = default_max_bytes()
    with zipfile.ZipFile(path) as zf:
        declared = sum(info.file_size for info in zf.infolist())
        if declared > limit:
            raise SlimError(f"{path.name!r} expands to {declared} bytes, over the {limit}-byte limit; "
                            f"upload less data (operators can raise {MAX_BYTES_ENV})")
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                dims, _, dtype = read(f)
            if dtype.hasobject:
                raise ValueError("object arrays need pickle")  # reported as the pickle refusal below
            need = int(np.prod(dims, dtype=np.float64) * dtype.itemsize)
            if need > info.file_size:
                raise SlimError(f"array {info.filename[:-4]!r} in {path.name!r} claims {need} bytes but "
                                f"holds {info.file_size}; the file is corrupt, re-save it with numpy.savez")


def load_npz(path: Path, task: str, shapes: tuple[tuple[int, ...], ...] | None, seed: int) -> Dataset:
    try:
        _vet_npz(path)
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except ValueError as err:
        if "pickle" in str(err).lower():
            raise SlimError(f"{path.name!r} holds object (pickled) arrays, which are refused for safety; "
                            "save plain numeric arrays with numpy.savez") from None
        raise SlimError(f"could not read {path.name!r} as .npz ({err}); save it with numpy.savez") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise SlimError(f"could not read {path.name!r} as .npz ({err}); save it with numpy.savez") from None
    keys = _input_keys(path, arrays, len(shapes) if shapes is not None else None)
    vkeys = [k + "_val" for k in keys]
    has_val = [k in arrays for k in vkeys]
    if any(has_val) and not all(has_val):
        raise SlimError(f"{path.name!r} has {vkeys[has_val.index(True)]} but no {vkeys[has_val.index(False)]}; "
                        "give every input's validation array or none")
    if any(has_val) != ("y_val" in arrays) and task == "classification":
        given, other = (vkeys[0], "y_val") if any(has_val) else ("y_val", vkeys[0])
        raise SlimError(f"{path.name!r} has {given} but no {other}; provide both or neither")
    labelled = task == "classification"
    if labelled and "y" not in arrays:
        raise SlimError(f"{path.name!r} has no labels array 'y', which classification needs; "
                        "add y (integer class per sample) or use task 'distillation'")

    xs = [_features(arrays[k], k) for k in keys]
    _same_rows(xs, keys)
    y = _labels(arrays["y"], "y", len(xs[0]), keys[0]) if labelled else None
    for i, xi in enumerate(xs):
        _check_shape(xi, shapes[i] if shapes is not None else None, keys[i] if len(keys) > 1 else "")
    if all(has_val):
        x_vals = [_features(arrays[k], k) for k in vkeys]
        _same_rows(x_vals, vkeys)
        for k, xv, xi in zip(keys, x_vals, xs, strict=True):
            if xv.shape[1:] != xi.shape[1:]:
                raise SlimError(f"{k}_val samples have shape {tuple(xv.shape[1:])} but {k} samples have "
                                f"{tuple(xi.shape[1:])}; they must match")
        y_val = _labels(arrays["y_val"], "y_val", len(x_vals[0]), vkeys[0]) if labelled else None
        return finish(io.pack(xs), y, io.pack(x_vals), y_val, vkeys[0] if len(keys) == 1 else "x*_val", None)
    return split(io.pack(xs), y, seed, None)


def _input_keys(path: Path, arrays: dict[str, np.ndarray], n_inputs: int | None) -> list[str]:
    """The arrays holding the model's inputs: ``x`` for one, ``x0``, ``x1``, … (in input order) for several."""
    numbered = sorted((int(k[1:]), k) for k in arrays if k[:1] == "x" and k[1:].isdigit())
    keys = [k for _, k in numbered]
    found = ", ".join(sorted(arrays)) or "none"
    if n_inputs is not None and n_inputs > 1:
        want = [f"x{i}" for i in range(n_inputs)]
        if keys != want:
            raise SlimError(f"the model takes {n_inputs} inputs; {path.name!r} needs arrays {', '.join(want)} "
                            f"(one per input, in input order; found: {found})")
        return want
    if "x" in arrays:
        return ["x"]
    if keys == ["x0"]:
        return keys
    if keys:
        raise SlimError(f"{path.name!r} holds {len(keys)} input arrays ({', '.join(keys)}) but the model takes one "
                        "input; save it as x")
    raise SlimError(f"{path.name!r} has no array named 'x' (found: {found}); "
                    "save inputs as x (and labels as y), e.g. numpy.savez(f, x=x, y=y)")


def _same_rows(xs: list[torch.Tensor], keys: list[str]) -> None:
    for k, t in zip(keys[1:], xs[1:], strict=True):
        if len(t) != len(xs[0]):
            raise SlimError(f"{k!r} has {len(t)} samples but {keys[0]!r} has {len(xs[0])}; every input needs one "
                            "row per sample")


def _features(a: np.ndarray, name: str) -> torch.Tensor:
    """Float32 with uint8 taken as 0-255 pixels, the usual convention for images saved from numpy."""
    if a.dtype.kind not in "biuf":
        raise SlimError(f"array {name!r} has dtype {a.dtype}, not numbers; save it as float32 or uint8")
    if a.ndim < 2:
        raise SlimError(f"array {name!r} has shape {a.shape}; it needs a sample axis first, (N, features...)")
    if a.shape[0] == 0:
        raise SlimError(f"array {name!r} is empty (0 samples); upload a data set with samples in it")
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, reported just below
        out = a.astype(np.float32) / np.float32(255) if a.dtype == np.uint8 else a.astype(np.float32)
    if not np.isfinite(out).all():
        idx = int(np.argwhere(~np.isfinite(out))[0][0])
        raise SlimError(f"array {name!r} has NaN or infinite values (first in sample {idx}); "
                        "clean or drop those samples")
    return torch.from_numpy(np.ascontiguousarray(out))


def _labels(a: np.ndarray, name: str, n: int, xname: str | None = None) -> torch.Tensor:
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        hint = " (one-hot? save y.argmax(1) instead)" if a.ndim == 2 else ""
        raise SlimError(f"labels {name!r} have shape {a.shape}; expected one class index per sample, "
                        f"shape ({n},){hint}")
    if len(a) != n:
        xname = xname or ("x_val" if name == "y_val" else "x")
        raise SlimError(f"{name!r} has {len(a)} labels but {xname!r} has {n} samples; they must match")
    if a.dtype.kind == "f" and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
        a = a.astype(np.int64)  # whole-number floats (e.g. from pandas) are unambiguous class indices
    if a.dtype.kind not in "iub":
        raise SlimError(f"labels {name!r} must be integer class indices, got dtype {a.dtype} "
                        "with non-integer values")
    out = a.astype(np.int64)
    if (out < 0).any():
        raise SlimError(f"labels {name!r} contain a negative value ({int(out.min())}); "
                        "class indices start at 0")
    return torch.from_numpy(out)


def _check_shape(x: torch.Tensor, shape: tuple[int, ...] | None, key: str = "") -> None:
    if shape is not None and tuple(x.shape[1:]) != shape[1:]:
        what = f"{key} samples" if key else "data samples"
        raise SlimError(f"{what} have shape {tuple(x.shape[1:])} but the model takes {shape[1:]}; "
                        f"reshape the data or fix input_shape{'s' if key else ''}")
