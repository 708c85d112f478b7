"""ONNX pooling (windowed and global) and Resize converters, exact to onnxruntime's window and coordinate rules.

PyTorch's pooling pads symmetrically, at most half a window, and (with ``ceil_mode``) drops a last
window that would start in the right padding, the rule ONNX adopted too. Whatever PyTorch can express
directly maps onto ``aten.max_pool2d`` / ``aten.avg_pool2d``; anything else (asymmetric or ``SAME_*``
pads, oversized pads, ceil-mode windows past the padding) is padded explicitly to exactly the ONNX
window layout, pooled without padding, and, for averages, rescaled by a constant map of the ONNX
divisors. Those geometries depend only on the spatial size, which the spec fixes.

Resize: nearest-neighbour maps are computed per axis the ONNX way and matched against PyTorch's
``nearest``/``nearest-exact`` kernels (run on an index ramp), else applied as constant ``index_select``
maps, so every coordinate and rounding mode is exact. Linear mode maps onto PyTorch's (bi/tri)linear
kernels for ``half_pixel``/``pytorch_half_pixel``/``align_corners``; other modes are refused.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .onnx_lift import Const, Lifter, op
from .onnx_ops import Node, arg, geometry, torch_pads

aten = torch.ops.aten
_MAX = {1: aten.max_pool1d, 2: aten.max_pool2d, 3: aten.max_pool3d}
_AVG = {1: aten.avg_pool1d, 2: aten.avg_pool2d, 3: aten.avg_pool3d}
_NEAREST = {1: aten.upsample_nearest1d, 2: aten.upsample_nearest2d, 3: aten.upsample_nearest3d}
_EXACT = {1: aten._upsample_nearest_exact1d, 2: aten._upsample_nearest_exact2d, 3: aten._upsample_nearest_exact3d}
_LINEAR = {1: aten.upsample_linear1d, 2: aten.upsample_bilinear2d, 3: aten.upsample_trilinear3d}


def _out_size(size: int, eff: int, s: int, pb: int, pe: int, ceil: bool, valid: bool) -> int:
    if valid:  # the spec's (deprecated) auto_pad=VALID formulas
        return -(-(size - eff + 1) // s) if ceil else (size - eff) // s + 1
    span = size + pb + pe - eff
    out = (-(-span // s) if ceil else span // s) + 1
    if ceil and (out - 1) * s >= size + pb:  # windows starting in the right padding are ignored
        out -= 1
    return out


@op("MaxPool", "AveragePool")
def pool(b: Lifter, n: Node, ins: list[Any], a: dict[str, Any], ver: int) -> Any:
    x = ins[0]
    kernel = list(a["kernel_shape"])
    k = len(kernel)
    if k not in _MAX:
        raise b.fail(f"{k}-d pooling is not supported")
    is_max = n.op_type == "MaxPool"
    ceil = bool(int(a.get("ceil_mode", 0)))
    strides, dil, begin, end = geometry(b, x, a, kernel)
    if not is_max and any(d != 1 for d in dil):
        raise b.fail("dilated average pooling is not supported")
    valid = a.get("auto_pad") == "VALID"
    effs = [(kk - 1) * d + 1 for kk, d in zip(kernel, dil, strict=True)]
    sizes = b.shape(x)[2:]
    outs = [_out_size(i, e, s, pb, pe, ceil, valid)
            for i, e, s, pb, pe in zip(sizes, effs, strides, begin, end, strict=True)]
    direct = not valid and begin == end and all(p <= e // 2 for p, e in zip(begin, effs, strict=True))
    if is_max:
        if direct:
            return b.call(_MAX[k], x, kernel, strides, begin, dil, ceil)
        ends = [(o - 1) * s + e - i - pb for o, s, e, i, pb in zip(outs, strides, effs, sizes, begin, strict=True)]
        x = b.call(aten.constant_pad_nd, x, torch_pads(begin, ends), -math.inf)
        return b.call(_MAX[k], x, kernel, strides, [0] * k, dil, False)
    include = bool(int(a.get("count_include_pad", 0)))
    if direct:
        return b.call(_AVG[k], x, kernel, strides, begin, ceil, include)
    ends = [(o - 1) * s + kk - i - pb for o, s, kk, i, pb in zip(outs, strides, kernel, sizes, begin, strict=True)]
    y = b.call(_AVG[k], b.call(aten.constant_pad_nd, x, torch_pads(begin, ends), 0.0), kernel, strides, [0] * k,
               False, True)
    factor = torch.ones(outs, dtype=torch.float64)
    for ax, (o, s, kk, i, pb, pe) in enumerate(zip(outs, strides, kernel, sizes, begin, end, strict=True)):
        starts = torch.arange(o, dtype=torch.float64) * s - pb
        if include:  # onnxruntime clips a window to the padded input, not to the ceil-mode overhang
            count = torch.clamp(starts + kk, max=i + pe) - starts
        else:
            count = torch.clamp(starts + kk, max=i) - torch.clamp(starts, min=0)
        shape = [1] * k
        shape[ax] = o
        factor = factor * (kk / count).reshape(shape)
    if bool((factor == 1).all()):
        return y
    return b.call(aten.mul, y, Const(factor.to(b.dtype(x))))


def _coords(ctm: str, dst: torch.Tensor, scale: float, size: int, out: int, length: float) -> torch.Tensor:
    """The ONNX source coordinate of each output index along one axis (float64).

    ``length`` is the resized length before rounding (``scale * size`` when scales are given).
    """
    if ctm == "half_pixel":
        return (dst + 0.5) / scale - 0.5
    if ctm == "pytorch_half_pixel":
        return (dst + 0.5) / scale - 0.5 if length > 1 else torch.zeros_like(dst)
    if ctm == "align_corners":
        return dst * (size - 1) / (length - 1) if length > 1 else torch.zeros_like(dst)
    if ctm == "asymmetric":
        return dst / scale
    if ctm == "half_pixel_symmetric":
        adjustment = out / length
        center = size / 2 * (1 - adjustment)
        return center + (dst + 0.5) / scale - 0.5
    raise ValueError(ctm)


def _round(mode: str, x: torch.Tensor) -> torch.Tensor:
    if mode == "floor":
        return torch.floor(x)
    if mode == "ceil":
        return torch.ceil(x)
    frac = x - torch.floor(x)
    tie = frac == 0.5
    near = torch.round(x)
    if mode == "round_prefer_floor":
        return torch.where(tie, torch.floor(x), near)
    if mode == "round_prefer_ceil":
        return torch.where(tie, torch.ceil(x), near)
    raise ValueError(mode)


@op("Resize")
def resize(b: Lifter, n: Node, ins: list[Any], a: dict[str, Any], ver: int) -> Any:
    x = ins[0]
    shape = b.shape(x)
    r = len(shape)
    mode = a.get("mode", "nearest")
    ctm = a.get("coordinate_transformation_mode", "half_pixel")
    if int(a.get("antialias", 0)):
        raise b.fail("antialiased resizing is not supported")
    if mode not in ("nearest", "linear") or ctm == "tf_crop_and_resize":
        raise b.fail(f"Resize mode {mode!r} with coordinate_transformation_mode {ctm!r} is not supported")
    axes = [int(i) % r for i in a.get("axes", range(r))]
    scales_in, sizes_in = arg(ins, 2), arg(ins, 3)
    sc = b.const(scales_in, "Resize scales").tolist() if scales_in is not None and b.value(scales_in).numel() else None
    sz = b.items(sizes_in, "Resize sizes") if sizes_in is not None and b.value(sizes_in).numel() else None
    if sz is not None and a.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise b.fail("keep_aspect_ratio_policy other than 'stretch' is not supported")
    scale, out = [1.0] * r, list(shape)
    size_args: list[Any] = list(shape)
    for k, ax in enumerate(axes):
        if sc is not None:
            scale[ax] = float(sc[k])
            out[ax] = size_args[ax] = int(math.floor(shape[ax] * scale[ax]))
        elif sz is not None:
            size_args[ax] = sz[k]
            out[ax] = int(b.value(sz[k]))
            scale[ax] = out[ax] / shape[ax]
        else:
            raise b.fail("neither scales nor sizes are given")
    if r < 3 or r > 5 or out[:2] != list(shape[:2]):
        raise b.fail("only resizing the spatial dims of a 3-d to 5-d (N, C, ...) tensor is supported")
    k = r - 2
    spatial = list(range(2, r))
    given = [scale[d] for d in spatial] if sc is not None else None
    if mode == "linear":
        if ctm == "pytorch_half_pixel" and min(out[2:]) > 1 or ctm == "half_pixel":
            align = False
        elif ctm == "align_corners" and (sc is None or all(out[d] == shape[d] * scale[d] for d in spatial)):
            align, given = True, None  # with scales, ONNX aligns to the unrounded length: exact only if whole
        else:
            raise b.fail(f"linear Resize with coordinate_transformation_mode {ctm!r} is not supported here "
                         "(supported: half_pixel, pytorch_half_pixel to sizes > 1, align_corners to whole sizes)")
        return _interp(b, _LINEAR[k], x, out, size_args, given, spatial, align)
    want = []
    for d in spatial:
        length = shape[d] * scale[d] if sc is not None else float(out[d])
        src = _coords(ctm, torch.arange(out[d], dtype=torch.float64), scale[d], shape[d], out[d], length)
        idx = _round(a.get("nearest_mode", "round_prefer_floor"), src).clamp(0, shape[d] - 1).to(torch.int64)
        want.append(idx)
    for family in (_NEAREST, _EXACT):
        if all(torch.equal(_torch_map(family[1], shape[d], out[d], given[i] if given else None), want[i])
               for i, d in enumerate(spatial)):
            return _interp(b, family[k], x, out, size_args, given, spatial, None)
    for i, d in enumerate(spatial):
        if not torch.equal(want[i], torch.arange(shape[d])):
            x = b.call(aten.index_select, x, d, Const(want[i]))
    return x


def _torch_map(fn: Any, size: int, out: int, scale: float | None) -> torch.Tensor:
    """Which source index a PyTorch nearest kernel reads for each output index along one axis."""
    ramp = torch.arange(size, dtype=torch.float64).reshape(1, 1, size)
    return fn(ramp, [out], scale).reshape(-1).to(torch.int64)


def _interp(b: Lifter, fn: Any, x: Any, out: list[int], size_args: list[Any], given: list[float] | None,
            spatial: list[int], align: bool | None) -> Any:
    """Prefer scale factors (the output size then follows the input at run time) when PyTorch's rounding
    of the size agrees with ONNX's; else pass the size, with the scales still steering the coordinates."""
    mid = () if align is None else (align,)
    if given is not None:
        y = b.call(fn, x, None, *mid, given)
        if list(b.shape(y)) == out:
            return y
        return b.call(fn, x, [size_args[d] for d in spatial], *mid, *given)
    return b.call(fn, x, [size_args[d] for d in spatial], *mid, None)


@op("GlobalAveragePool", "GlobalMaxPool")
def global_pool(b: Lifter, n: Node, ins: list[Any], a: dict[str, Any], ver: int) -> Any:
    dims = list(range(2, len(b.shape(ins[0]))))
    return b.call(aten.mean if n.op_type == "GlobalAveragePool" else aten.amax, ins[0], dims, True)
