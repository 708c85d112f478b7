"""Turn an uploaded data file into tensors, or say in one line what is wrong with it.

Pruning quality is judged on held-out data, so every data set leaves here with a validation part and a
record of where it came from (``val_source``); silently training and evaluating on the same samples would
make a bad prune look good. All checks happen up front: a job that fails an hour into training because of
one NaN or a mislabelled folder wastes the user's time and ours.
"""

from __future__ import annotations

import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Sampler, TensorDataset

from . import io
from .archive import MAX_BYTES_ENV, default_max_bytes, safe_extract
from .errors import SlimError

TASKS = ("classification", "distillation")
SUPPORTED = ".npz, .zip, .tar.gz, .tgz or .tar"
IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
VAL_FRACTION = 0.2
# Archive tools (macOS Finder especially) add these; they are never part of the data set.
_JUNK_DIRS = frozenset({"__MACOSX"})


@dataclass
class Dataset:
    """Training and evaluation tensors, ready for a model that takes ``x_train.shape[1:]``.

    ``x_*`` is a tensor, or for a model with several inputs a tuple of tensors in input order (npz ``x0``,
    ``x1``, …; see :mod:`slimcore.io` for slicing and calling either form).

    ``y_*`` and ``num_classes`` are None for distillation, where the teacher model supplies the targets.
    ``classes`` maps label index to folder name for ImageFolder archives (None for npz).
    """

    x_train: io.Inputs
    y_train: torch.Tensor | None
    x_val: io.Inputs
    y_val: torch.Tensor | None
    num_classes: int | None
    val_source: str
    classes: list[str] | None


def load_dataset(path: Path, *, task: str, input_shape: Any, seed: int = 0,
                 workdir: Path | None = None, options: Any = None) -> Dataset:
    """Load and validate a data file; raises SlimError so a bad upload fails before any training starts.

    ``input_shape`` is batch-first (as in the job spec), one shape or a tuple of shapes (one per model
    input); only the per-sample part is compared. Archives are extracted into a fresh folder inside
    ``workdir`` (a temporary one, removed afterwards, when None).
    """
    if task not in TASKS:
        raise SlimError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    path = Path(path)
    if not path.is_file():
        raise SlimError(f"data file {path.name!r} does not exist or is not a file")
    name = path.name.lower()
    shapes = io.as_shapes(input_shape)
    shape = shapes[0] if shapes is not None else None
    if name.endswith(".npz"):
        return _load_npz(path, task, shapes, seed)
    if shapes is not None and len(shapes) > 1:
        raise SlimError(f"the model takes {len(shapes)} inputs; image archives feed one, so upload an .npz with "
                        f"arrays {', '.join(f'x{i}' for i in range(len(shapes)))}")
    if name.endswith((".zip", ".tar.gz", ".tgz", ".tar")):
        if workdir is None:
            with tempfile.TemporaryDirectory(prefix="slim-data-") as tmp:
                return _load_image_folder(path, task, shape, seed, Path(tmp))
        Path(workdir).mkdir(parents=True, exist_ok=True)
        dest = Path(tempfile.mkdtemp(prefix="data-", dir=workdir))
        return _load_image_folder(path, task, shape, seed, dest)
    raise SlimError(f"unsupported data file {path.name!r}; upload {SUPPORTED} "
                    "(npz with arrays x and y, or an archive of train/<class>/<image>)")


def make_loader(x: io.Inputs, y: torch.Tensor | None, batch_size: int, *, shuffle: bool, seed: int,
                pin_memory: bool = False) -> DataLoader:
    """Batches for training (``shuffle=True``) or evaluation, reproducible from ``seed``.

    Each batch is a list ``[x, y]``, or ``[x]`` when ``y`` is None (distillation), so ``batch[0]`` is always
    the inputs: a tensor, or a tuple of tensors when ``x`` is one (several model inputs). Batches are sliced
    from the tensors in one indexing operation rather than stacked sample by sample (far faster on CPU),
    which is why ``loader.batch_size`` is None; use ``len(loader)`` for the number of batches.
    With ``shuffle=True`` a trailing batch of a single sample is dropped (each epoch drops a different one),
    because BatchNorm cannot compute batch statistics from one sample and would raise mid-training.
    """
    if batch_size < 1:
        raise SlimError(f"batch_size must be at least 1, got {batch_size}")
    if isinstance(x, torch.Tensor):
        dataset: Any = TensorDataset(x) if y is None else TensorDataset(x, y)
    else:
        dataset = _MultiInput(tuple(x), y)
    sampler = _Batches(len(dataset), batch_size, shuffle=shuffle, seed=seed)
    return DataLoader(dataset, sampler=sampler, batch_size=None, pin_memory=pin_memory)


class _MultiInput(torch.utils.data.Dataset):
    """Like TensorDataset, but the inputs of one row stay together as a tuple: ``[(x0, x1, …), y]``."""

    def __init__(self, xs: tuple[torch.Tensor, ...], y: torch.Tensor | None) -> None:
        self.xs, self.y = xs, y

    def __getitem__(self, index: Any) -> list[Any]:
        row: list[Any] = [tuple(t[index] for t in self.xs)]
        return row if self.y is None else [*row, self.y[index]]

    def __len__(self) -> int:
        return int(self.xs[0].shape[0])


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


def _load_npz(path: Path, task: str, shapes: tuple[tuple[int, ...], ...] | None, seed: int) -> Dataset:
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
        return _finish(io.pack(xs), y, io.pack(x_vals), y_val, vkeys[0] if len(keys) == 1 else "x*_val", None)
    return _split(io.pack(xs), y, seed, None)


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


def _split(x: io.Inputs, y: torch.Tensor | None, seed: int, classes: list[str] | None) -> Dataset:
    """Hold out a seeded random 20% so reruns of a job evaluate on the same samples."""
    n = io.num_rows(x)
    if n < 2:
        raise SlimError(f"the data set has {n} sample; at least 2 are needed to hold one out for evaluation")
    n_val = max(1, int(n * VAL_FRACTION))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val, train = perm[:n_val].sort().values, perm[n_val:].sort().values
    return _finish(io.rows(x, train), None if y is None else y[train], io.rows(x, val), None if y is None else y[val],
                   f"split:{VAL_FRACTION}", classes)


def _finish(x: io.Inputs, y: torch.Tensor | None, x_val: io.Inputs, y_val: torch.Tensor | None,
            val_source: str, classes: list[str] | None) -> Dataset:
    if io.num_rows(x) < 2 and val_source != f"split:{VAL_FRACTION}":
        raise SlimError(f"the training data has {io.num_rows(x)} sample; at least 2 are needed")
    num_classes = None
    if y is not None and y_val is not None:
        num_classes = len(classes) if classes else int(max(int(y.max()), int(y_val.max()))) + 1
    return Dataset(x, y, x_val, y_val, num_classes, val_source, classes)


# --- ImageFolder archives -----------------------------------------------------------------------------


def _load_image_folder(path: Path, task: str, shape: tuple[int, ...] | None, seed: int,
                       dest: Path) -> Dataset:
    if shape is None or len(shape) != 4 or shape[1] not in (1, 3):
        got = "none" if shape is None else list(shape)
        raise SlimError(f"image archives need input_shape [N, C, H, W] with C=1 (grayscale) or 3 (RGB) "
                        f"to size the images; got {got}")
    safe_extract(path, dest)
    labelled = task == "classification"
    flat = None if labelled else _flat_images(dest)
    if flat is not None:  # distillation from unlabeled images: the teacher gives the targets
        root, files = flat
        return _split(_read_images(files, root, shape), None, seed, None)
    root = _find_root(dest)
    classes = _class_dirs(root / "train", "train")
    train_files, train_labels = _list_images(root / "train", classes, labelled)
    x = _read_images(train_files, root, shape)
    y = torch.tensor(train_labels, dtype=torch.int64) if labelled else None
    if not (root / "val").is_dir():
        return _split(x, y, seed, classes if labelled else None)
    val_classes = _class_dirs(root / "val", "val")
    unknown = sorted(set(val_classes) - set(classes))
    if unknown:
        raise SlimError(f"val/ has class folder {unknown[0]!r} that train/ does not have "
                        f"(train classes: {', '.join(classes)}); val must use train's classes")
    val_files, val_labels = _list_images(root / "val", classes, labelled, only=val_classes)
    x_val = _read_images(val_files, root, shape)
    y_val = torch.tensor(val_labels, dtype=torch.int64) if labelled else None
    return _finish(x, y, x_val, y_val, "val/", classes if labelled else None)


def _visible_name(name: str) -> bool:
    """Hidden entries (``.DS_Store``, macOS ``._x.png`` resource forks) look like images but are not."""
    return not name.startswith(".") and name not in _JUNK_DIRS


def _visible(p: Path) -> bool:
    return _visible_name(p.name)


def _find_root(dest: Path) -> Path:
    """Accept ``train/`` at the top or inside one wrapper folder, as zipping a folder usually produces."""
    if (dest / "train").is_dir():
        return dest
    top = sorted(p for p in dest.iterdir() if _visible(p))
    if len(top) == 1 and (top[0] / "train").is_dir():
        return top[0]
    found = ", ".join(p.name + ("/" if p.is_dir() else "") for p in top[:5]) or "nothing"
    raise SlimError(f"the archive has no train/ folder (top level holds: {found}); "
                    "lay it out as train/<class>/<image> and optionally val/<class>/<image>")


def _flat_images(dest: Path) -> tuple[Path, list[Path]] | None:
    """Images in one folder (at the top or in one wrapper folder), no train/ and no class folders: what a
    detection or segmentation user has. Only for distillation; None when the layout is not that."""
    root = dest
    top = sorted(p for p in dest.iterdir() if _visible(p))
    if len(top) == 1 and top[0].is_dir():
        root = top[0]
    if (root / "train").is_dir():
        return None
    files = sorted(p for p in root.iterdir() if p.is_file() and _visible(p) and p.suffix.lower() in IMAGE_EXTS)
    if not files or any(p.is_dir() and _visible(p) for p in root.iterdir()):
        return None
    return root, files


def _class_dirs(split_dir: Path, split: str) -> list[str]:
    names = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and _visible(p))
    if not names:
        raise SlimError(f"{split}/ has no class folders; lay it out as {split}/<class>/<image>")
    return names


def _list_images(split_dir: Path, classes: list[str], labelled: bool,
                 only: list[str] | None = None) -> tuple[list[Path], list[int]]:
    split = split_dir.name
    stray = [p for p in split_dir.iterdir() if p.is_file() and _visible(p) and p.suffix.lower() in IMAGE_EXTS]
    if stray:
        raise SlimError(f"image '{split}/{stray[0].name}' is not inside a class folder; "
                        f"move images into {split}/<class>/")
    files: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        if only is not None and name not in only:
            continue
        found = sorted(p for p in (split_dir / name).rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTS
                       and all(_visible_name(part) for part in p.relative_to(split_dir).parts))
        if not found:
            raise SlimError(f"class folder '{split}/{name}' has no images "
                            f"({', '.join(sorted(IMAGE_EXTS))}); add some or remove the folder")
        files += found
        labels += [index] * len(found)
    return files, labels if labelled else []


def _read_images(files: list[Path], root: Path, shape: tuple[int, ...]) -> torch.Tensor:
    """Decode, convert and resize each image into one preallocated array to keep peak memory at 1x."""
    _, c, h, w = shape
    mode = "L" if c == 1 else "RGB"
    out = np.empty((len(files), c, h, w), dtype=np.float32)
    for i, f in enumerate(files):
        rel = f.relative_to(root).as_posix()
        try:
            with Image.open(f) as im:
                im.draft(mode, (w, h))  # JPEG: decode at reduced scale when the target is much smaller
                small = _eight_bit(im).convert(mode).resize((w, h), Image.Resampling.BILINEAR)
                arr = np.asarray(small, dtype=np.uint8)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise SlimError(f"could not read image {rel!r} ({err}); re-save it or remove it") from None
        out[i] = arr[None] / np.float32(255) if c == 1 else arr.transpose(2, 0, 1) / np.float32(255)
    return torch.from_numpy(out)


def _eight_bit(im: Image.Image) -> Image.Image:
    """Scale 16-bit grayscale down ourselves: Pillow's own conversion clips it, turning most pixels white."""
    if im.mode not in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        return im
    a = np.asarray(im, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(a / 257), 0, 255).astype(np.uint8), "L")
