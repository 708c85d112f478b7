"""Model inputs and outputs of any arity: one place that knows a batch may be several tensors and an output
may be a tuple, list or dict of tensors.

Every stage (import parity, training losses, evaluation, pruning checks, export checks, measurement) calls
models through :func:`call` and compares outputs through :func:`leaves`/:func:`named_leaves`, so a
single-tensor model and a detection model that returns ``(boxes, [p3, p4, p5])`` take the same code path
and no stage silently looks at the first output only.

``Inputs`` is a tensor (one model input) or a tuple of tensors (several, in forward order), each with the
batch on dim 0. Single-input code keeps passing plain tensors: every helper accepts both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeAlias

import torch
import torch.utils._pytree as pytree

Inputs: TypeAlias = "torch.Tensor | tuple[torch.Tensor, ...]"
Shape: TypeAlias = "tuple[int, ...]"


class LazyInputs:
    """Inputs too many to hold in memory (an image folder, tar shards, a memory-mapped array): samples are
    decoded on demand. Every helper here accepts them where it accepts tensors, materialising only the rows
    asked for (:func:`rows`) or one batch at a time (:func:`batches`), so code that looks at a few samples
    (examples, calibration, checks) needs no second path. Training asks the data package for a loader."""

    rank: int  # dimensions of one batch of the first input, e.g. 4 for images

    def __len__(self) -> int:
        raise NotImplementedError

    def take(self, positions: Sequence[int]) -> Inputs:
        """The samples at ``positions``, decoded the deterministic (evaluation) way and stacked."""
        raise NotImplementedError

    def batches(self, size: int) -> Iterable[Inputs]:
        """Every sample in order, ``size`` at a time (decoded on loader workers)."""
        raise NotImplementedError


def args(x: Any) -> tuple[torch.Tensor, ...]:
    """The positional arguments ``x`` stands for: ``(x,)`` for a tensor, the tensors themselves for a tuple."""
    if isinstance(x, LazyInputs):
        return args(x.take([0]))
    return (x,) if isinstance(x, torch.Tensor) else tuple(x)


def pack(xs: Sequence[torch.Tensor]) -> Inputs:
    """The inverse of :func:`args`: a lone tensor stays a tensor, so single-input code sees no tuples."""
    return xs[0] if len(xs) == 1 else tuple(xs)


def call(model: Callable[..., Any], x: Any) -> Any:
    """``model(x)`` or ``model(*x)``: run a model on one batch of :data:`Inputs`."""
    return model(*args(x))


def num_rows(x: Any) -> int:
    """Batch size of ``x`` (all inputs share it)."""
    if isinstance(x, LazyInputs):
        return len(x)
    return int(args(x)[0].shape[0])


def rank(x: Any) -> int:
    """Dimensions of a batch of the first input (4 for images): decides channels_last on CUDA."""
    return x.rank if isinstance(x, LazyInputs) else args(x)[0].dim()


def rows(x: Any, index: Any) -> Inputs:
    """``x[index]`` along the batch for every input (a slice, index tensor or list); lazy inputs decode
    just those rows."""
    if isinstance(x, LazyInputs):
        positions = range(len(x))[index] if isinstance(index, slice) else torch.as_tensor(index).tolist()
        return x.take(list(positions))
    return pack([t[index] for t in args(x)])


def batches(x: Any, size: int) -> Iterable[Inputs]:
    """``x`` cut into consecutive batches of ``size`` rows (the last may be shorter)."""
    if isinstance(x, LazyInputs):
        return x.batches(size)
    return [rows(x, slice(i, i + size)) for i in range(0, num_rows(x), size)]


def apply(x: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` on every tensor of ``x``, keeping its form (tensor, tuple, or any output structure)."""
    return pytree.tree_map(lambda t: fn(t) if isinstance(t, torch.Tensor) else t, x)


def as_shapes(shape: Any) -> tuple[Shape, ...] | None:
    """One shape ``(1, 3, 32, 32)`` or several ``((1, 3, 32, 32), (1, 8))`` as a tuple of shapes."""
    if shape is None:
        return None
    items = list(shape)
    if items and all(isinstance(d, int) for d in items):
        return (tuple(int(d) for d in items),)
    return tuple(tuple(int(d) for d in s) for s in items)


def random_inputs(shapes: Sequence[Shape], batch: int, seed: int = 0) -> Inputs:
    """Seeded normal noise at ``batch`` rows for each input shape (importers' parity examples)."""
    g = torch.Generator().manual_seed(seed)
    return pack([torch.randn((batch, *s[1:]), generator=g) for s in shapes])


# --- outputs -----------------------------------------------------------------------------------------


def leaves(out: Any) -> list[torch.Tensor]:
    """Every tensor of an output, in a fixed order (dicts in insertion order, as TorchScript and ONNX keep it)."""
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def plain(out: Any) -> Any:
    """``out`` with fx's immutable dicts/lists (what a GraphModule's output node holds, and what a
    non-strict ``torch.export`` of one then returns) as plain ``dict``/``list``; other containers
    (``OrderedDict``, tuples) keep their type."""
    from torch.fx.immutable_collections import immutable_dict, immutable_list

    if isinstance(out, dict):
        items = {k: plain(v) for k, v in out.items()}
        return items if isinstance(out, immutable_dict) else type(out)(items)
    if isinstance(out, list):
        items_ = [plain(v) for v in out]
        return items_ if isinstance(out, immutable_list) else type(out)(items_)
    if type(out) is tuple:
        return tuple(plain(v) for v in out)
    return out


def structure(out: Any) -> Any:
    """A comparable description of an output's form: ``"tensor"``, or nested lists/tuples/dicts of it."""
    if isinstance(out, torch.Tensor):
        return "tensor"
    if isinstance(out, dict):
        return {str(k): structure(v) for k, v in out.items()}
    if isinstance(out, list):
        return [structure(v) for v in out]
    if isinstance(out, tuple):  # named tuples compare as tuples
        return tuple(structure(v) for v in out)
    return type(out).__name__


def names(out: Any) -> list[str]:
    """A name per leaf, for reports and errors: ``output`` for a lone tensor, else the path (``out``,
    ``aux``, ``0``, ``1.2``), dict keys as they are."""
    if isinstance(out, torch.Tensor):
        return ["output"]
    paths, _ = pytree.tree_flatten_with_path(out)
    result = []
    for path, leaf in paths:
        if isinstance(leaf, torch.Tensor):
            parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
            result.append(".".join(parts) or "output")
    return result


def named_leaves(out: Any, given: Sequence[str] | None = None) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` per output; ``given`` (e.g. ONNX output names) wins when it has one per leaf."""
    ts = leaves(out)
    ns = list(given) if given is not None and len(given) == len(ts) else names(out)
    return list(zip(ns, ts, strict=True))


def describe(out: Any) -> str:
    """``{'out': (2, 3, 8, 8), 'aux': (2, 3, 8, 8)}``-style text for one-line errors."""
    if isinstance(out, torch.Tensor):
        return str(tuple(out.shape))
    if isinstance(out, dict):
        return "{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in out.items()) + "}"
    if isinstance(out, list | tuple):
        inner = ", ".join(describe(v) for v in out)
        return f"[{inner}]" if isinstance(out, list) else f"({inner}{',' if len(out) == 1 else ''})"
    return type(out).__name__


def rel_error(got: Any, want: Any) -> float:
    """Largest per-output ``max|got − want| / max|want|`` (inf if the structures or shapes differ)."""
    a, b = leaves(got), leaves(want)
    if structure(got) != structure(want) or any(x.shape != y.shape for x, y in zip(a, b, strict=True)):
        return float("inf")
    return max((float((x.detach().float() - y.detach().float()).abs().max()
                      / y.detach().float().abs().max().clamp_min(1e-12)) for x, y in zip(a, b, strict=True)
                if y.numel()), default=0.0)


def max_abs_diff(got: Any, want: Any) -> float:
    """Largest absolute change over every output element."""
    return max((float((x.detach().float() - y.detach().float()).abs().max())
                for x, y in zip(leaves(got), leaves(want), strict=True) if y.numel()), default=0.0)


def _probabilities(t: torch.Tensor) -> bool:
    t = t.detach().float()
    return bool((t >= 0).all()) and bool(torch.allclose(t.sum(1), torch.ones(t.shape[0], device=t.device),
                                                        atol=1e-3))


def classifier_output(out: Any, names_: Sequence[str] | None = None) -> tuple[int | None, str]:
    """Which leaf is the ``(batch, classes)`` output for classification: its index, or None and why not.

    A lone tensor is the classifier output when it is 2-d. With several outputs, the single 2-d one is
    used (a classifier with an auxiliary feature map); among several 2-d ones, probabilities (rows ≥ 0
    summing to 1: ultralytics' classifiers return ``(softmax, logits)`` in eval mode) are passed over when
    exactly one output is left, the logits cross-entropy needs. Otherwise an error names them all.
    """
    named = named_leaves(out, names_)
    two_d = [i for i, (_, t) in enumerate(named) if t.dim() == 2]
    if len(two_d) > 1:
        not_probs = [i for i in two_d if not _probabilities(named[i][1])]
        two_d = not_probs if len(not_probs) == 1 else two_d
    if len(two_d) == 1:
        return two_d[0], ""
    shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in named)
    if not two_d:
        return None, (f"task 'classification' needs one (batch, classes) output; the model gives {shapes}; "
                      "use task 'distillation'")
    return None, (f"task 'classification' needs exactly one (batch, classes) output; the model gives {shapes}; "
                  "use task 'distillation' or return only the logits")
