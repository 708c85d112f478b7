""".npz data: arrays ``x`` (or ``x0``, ``x1``, … for several inputs), labels ``y``, optional ``*_val``.

All checks happen up front: a job that fails an hour into training because of one NaN or a mislabelled
array wastes the user's time and ours. Arrays are vetted against their zip headers before numpy allocates
anything (an npz is a zip, and its headers are user input).
"""

from __future__ import annotations

import io as _io
import os
import shutil
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import io
from ..archive import MAX_BYTES_ENV, default_max_bytes
from ..cache import cache_root
from ..errors import SlimError
from .core import Dataset, finish, split
from .folders import in_memory_limit
from .prep import ArrayPrep
from .samples import ArraySamples

# --- npz ----------------------------------------------------------------------------------------------


def _vet_npz(path: Path) -> None:
    """An npz is a zip too: bound what it inflates to before numpy allocates arrays from its headers."""
    limit = default_max_bytes()
    with zipfile.ZipFile(path) as zf:  # stored (numpy.savez) members are mapped, never inflated
        declared = sum(info.file_size for info in zf.infolist() if info.compress_type != zipfile.ZIP_STORED)
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


def load_npz(path: Path, task: str, shapes: tuple[tuple[int, ...], ...] | None, seed: int,
             workers: int = 0) -> Dataset:
    """Arrays larger than ``SLIM_DATA_IN_MEMORY_MB`` as float32 stay memory-mapped (numpy.savez stores
    members uncompressed, so they are mapped in place; a compressed one is inflated once into the cache) and
    are read row by row on loader workers; smaller ones are loaded as before."""
    try:
        _vet_npz(path)
        arrays = _open_arrays(path)
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
    _same_rows(xs, keys)  # type: ignore[arg-type]
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
        return _sourced(finish(_inputs(xs, workers), y, _inputs(x_vals, workers), y_val,
                               vkeys[0] if len(keys) == 1 else "x*_val", None))
    return _sourced(split(_inputs(xs, workers), y, seed, None))


def _inputs(xs: list[Any], workers: int) -> Any:
    """Tensors as they are; any memory-mapped array makes the inputs lazy rows."""
    if all(isinstance(x, torch.Tensor) for x in xs):
        return io.pack(xs)
    return ArraySamples(xs, [ArrayPrep(tuple(x.shape[1:]), None) for x in xs], workers)


def _sourced(ds: Dataset) -> Dataset:
    ds.source = "lazy" if isinstance(ds.x_train, io.LazyInputs) else "memory"
    return ds


def _open_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of the npz: stored members memory-mapped in place, compressed ones read (or, when larger
    than the in-memory limit, inflated once into the cache and mapped)."""
    out: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            key = info.filename[:-4]
            if info.compress_type == zipfile.ZIP_STORED:
                raw.seek(info.header_offset + 26)
                name_len, extra_len = struct.unpack("<HH", raw.read(4))
                raw.seek(info.header_offset + 30 + name_len + extra_len)
                version = np.lib.format.read_magic(raw)
                dims, fortran, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                        else np.lib.format.read_array_header_2_0)(raw)
                if dtype.hasobject:
                    raise ValueError("object arrays need pickle")
                if int(np.prod(dims)) == 0:
                    out[key] = np.zeros(dims, dtype)
                    continue
                out[key] = np.memmap(path, dtype=dtype, mode="r", offset=raw.tell(), shape=dims,
                                     order="F" if fortran else "C")
            elif info.file_size > in_memory_limit():
                out[key] = np.load(_inflated(zf, info, path), mmap_mode="r", allow_pickle=False)
            else:
                with zf.open(info) as f:
                    out[key] = np.load(_io.BytesIO(f.read()), allow_pickle=False)
    return out


def _inflated(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> Path:
    dest = cache_root() / "npy" / f"{path.stat().st_size}-{info.CRC:08x}-{info.filename}"
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".part-{os.getpid()}-{dest.name}")
        with zf.open(info) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        tmp.replace(dest)
    return dest


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
    big = isinstance(a, np.memmap) and a.size * 4 > in_memory_limit()
    step = max(1, (64 * 1024**2) // max(1, int(np.prod(a.shape[1:])) * 4)) if big else len(a)
    for start in range(0, len(a), step):  # a mapped array is checked in 64 MB slices, never loaded whole
        with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, reported just below
            part = a[start:start + step]
            out = part.astype(np.float32) / np.float32(255) if a.dtype == np.uint8 else part.astype(np.float32)
        if not np.isfinite(out).all():
            idx = start + int(np.argwhere(~np.isfinite(out))[0][0])
            raise SlimError(f"array {name!r} has NaN or infinite values (first in sample {idx}); "
                            "clean or drop those samples")
    if big:
        return a  # type: ignore[return-value]
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
