"""Turning one stored sample into the tensor a model takes: decoding, resizing, cropping, normalising, and
for training the spec's augmentation (``data.augment``).

Evaluation is deterministic; training adds ``standard`` (random-resized-crop + horizontal flip, the recipe
network slimming's CIFAR/ImageNet results were trained with) or ``strong`` (that plus TrivialAugment and
random erasing). The random-resized-crop keeps 25–100% of the area: the ImageNet default (8%) is tuned for
90-epoch schedules and costs accuracy in the few epochs of a pruning job's fine-tuning.
"""

from __future__ import annotations

import io as _io
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2 as T
from PIL import Image

from ..errors import SlimError

IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
SCALE = (0.25, 1.0)
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError)


def _augmenter(kind: str, size: tuple[int, int]) -> Any:
    if kind == "none":
        return None
    steps: list[Any] = [T.RandomResizedCrop(size, scale=SCALE, antialias=True), T.RandomHorizontalFlip()]
    if kind == "strong":
        steps.append(T.TrivialAugmentWide())
    return T.Compose(steps)


class Normalise:
    """``(x - mean) / std`` per channel, or nothing when the spec gives none."""

    def __init__(self, options: Any, channels: int) -> None:
        self.mean = self.std = None
        if options is not None and options.mean is not None:
            if len(options.mean) != channels:
                raise SlimError(f"data.mean has {len(options.mean)} values but the samples have {channels} "
                                "channels; give one per channel")
            self.mean = torch.tensor(options.mean, dtype=torch.float32).view(-1, *([1] * 2))
            self.std = torch.tensor(options.std, dtype=torch.float32).view(-1, *([1] * 2))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is None:
            return x
        mean, std = self.mean, self.std
        if x.dim() != 3:  # samples that are not (C, H, W): normalise along the first axis
            shape = (-1, *([1] * (x.dim() - 1)))
            mean, std = mean.view(shape), std.view(shape)  # type: ignore[union-attr]
        return (x - mean) / std


class ImagePrep:
    """Bytes of an image file → float32 ``(C, H, W)`` in 0–1, then normalised."""

    def __init__(self, shape: tuple[int, ...], options: Any) -> None:
        _, self.c, h, w = shape
        crop = getattr(options, "crop", None)
        if crop is not None:
            h, w = (crop, crop) if isinstance(crop, int) else (crop[0], crop[1])
        self.h, self.w = h, w
        self.mode = "L" if self.c == 1 else "RGB"
        self.resize = getattr(options, "resize", None)
        self.augment = _augmenter(getattr(options, "augment", "none"), (h, w))
        self.erase = T.RandomErasing(p=0.25) if getattr(options, "augment", "none") == "strong" else None
        self.norm = Normalise(options, self.c)

    def decode(self, data: bytes, name: Callable[[], str]) -> Image.Image:
        """``name`` is called only to word an error: building it for every sample would cost the loader."""
        try:
            with Image.open(_io.BytesIO(data)) as im:
                target = (self.w, self.h) if self.resize is None else (self.resize, self.resize)
                im.draft(self.mode, target)  # JPEG: decode at reduced scale when the target is much smaller
                return _eight_bit(im).convert(self.mode)
        except UNREADABLE as err:
            raise SlimError(f"could not read image {name()!r} ({err}); re-save it or remove it") from None

    def __call__(self, data: bytes, name: Callable[[], str], *, train: bool) -> torch.Tensor:
        im = self.decode(data, name)
        augment = train and self.augment is not None
        if self.resize is None:
            if not augment:
                im = im.resize((self.w, self.h), Image.Resampling.BILINEAR)
        else:
            scale = self.resize / min(im.size)
            im = im.resize((max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale))),
                           Image.Resampling.BILINEAR)
            if not augment:
                left, top = (im.size[0] - self.w) // 2, (im.size[1] - self.h) // 2
                if left < 0 or top < 0:
                    raise SlimError(f"data.resize {self.resize} is smaller than the {self.h}×{self.w} crop; "
                                    "make resize at least the crop size")
                im = im.crop((left, top, left + self.w, top + self.h))
        arr = np.asarray(im, dtype=np.uint8)
        x = torch.from_numpy(arr[None].copy() if arr.ndim == 2 else arr.transpose(2, 0, 1).copy())
        if augment:
            x = self.augment(x)
        x = x.float().div_(255)
        if train and self.erase is not None:
            x = self.erase(x)
        return self.norm(x)


class ArrayPrep:
    """An npz sample (already float32 in 0–1 for uint8 data) → augmented for training when asked (4-d
    image arrays only) and normalised."""

    def __init__(self, sample_shape: tuple[int, ...], options: Any) -> None:
        kind = getattr(options, "augment", "none")
        if kind != "none" and len(sample_shape) != 3:
            raise SlimError(f"data.augment {kind!r} needs image arrays (N, C, H, W); these samples have shape "
                            f"{sample_shape}: use augment 'none'")
        self.augment = _augmenter(kind, tuple(sample_shape[1:])) if kind != "none" else None  # type: ignore[arg-type]
        self.strong = kind == "strong"
        self.erase = T.RandomErasing(p=0.25) if self.strong else None
        self.norm = Normalise(options, sample_shape[0]) if len(sample_shape) >= 1 else Normalise(None, 0)

    def __call__(self, x: torch.Tensor, *, train: bool) -> torch.Tensor:
        if train and self.augment is not None:
            if self.strong:  # TrivialAugment's photometric ops work on 8-bit pixels
                x = self.augment((x.clamp(0, 1) * 255).round().to(torch.uint8)).float().div_(255)
                x = self.erase(x)  # type: ignore[misc]
            else:
                x = self.augment(x)
        return self.norm(x)


def _eight_bit(im: Image.Image) -> Image.Image:
    """Scale 16-bit grayscale down ourselves: Pillow's own conversion clips it, turning most pixels white."""
    if im.mode not in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        return im
    a = np.asarray(im, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(a / 257), 0, 255).astype(np.uint8), "L")
