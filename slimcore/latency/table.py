"""The latency table: every prunable conv/linear layer timed on the target runtime as a function of its
kept channels, at its real input shape (NetAdapt's layer-wise lookup tables, measured on the worker).

For each layer dimension a group can shrink (a conv's input or output channels; both at once for a
depthwise conv) two kinds of probes run, each a single-layer model on the runtime:

- **the step**: counts just below a multiple of 16 (b, b-8, b-4, b-2, b-1). A count more than
  ``SLOW`` slower than the larger, 16-aligned ``b`` is off the runtime's fast path (onnxruntime's NCHWc
  kernels: a depthwise conv at 143 channels ran 2x slower than at 144 here). The step is the smallest
  alignment (1, 2, 4, 8, 16) whose probes are all fast; the planner rounds kept counts up to it.
- **the curve**: a handful of counts, multiples of the step, from an eighth of the layer to all of it;
  latency at any count is interpolated on it.

A layer's latency with both dims shrunk is its full latency times the two dims' ratios (exact where cost
is proportional to channels in x channels out). The model's latency is the measured whole-model latency
with each layer's full time replaced by its predicted one; the closed loop in :mod:`.planner` corrects
what this misses (fusions, memory traffic, layers no group touches). Probes are cached on disk per
runtime, version, threads, batch and hardware, so the next job on the same worker measures nothing.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import io
from ..cache import cache_root
from ..groups import CONV_TYPES, GroupSet, public_name
from .runtime import Runtime, hardware

SLOW = 1.15  # a probe this much slower than a larger aligned count is off the fast path
ALIGNMENTS = (1, 2, 4, 8, 16)
MIN_STEP_DIM = 24  # narrower dims keep step 1: their probes cost more than their alignment could save
CURVE = (0.125, 0.25, 0.5, 0.75)


def cache_dir() -> Path:
    return cache_root() / "latency"


class ProbeCache:
    """Probe timings (ms) by probe key, one JSON file per runtime key + hardware; merged on save so
    concurrent workers only ever add entries."""

    def __init__(self, runtime_key: str, hw: str) -> None:
        digest = hashlib.sha1(f"{runtime_key}|{hw}".encode()).hexdigest()[:16]
        self.path = cache_dir() / f"{digest}.json"
        self.entries: dict[str, float] = self._read()
        self.new = 0

    def _read(self) -> dict[str, float]:
        try:
            return {str(k): float(v) for k, v in json.loads(self.path.read_text()).items()}
        except (OSError, ValueError, AttributeError):
            return {}

    def save(self) -> None:
        if not self.new:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            merged = {**self._read(), **self.entries}
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(merged, f)
            os.replace(tmp, self.path)
        except OSError:  # a read-only cache costs the next job its probes, nothing else
            pass


@dataclass
class Site:
    """One conv/linear layer a group shrinks, with its batch-1 input shape."""

    name: str
    module: nn.Module
    kind: str  # "conv" | "dw" (depthwise: in = out = groups) | "linear" | "fixed" (grouped: not probed)
    in_shape: tuple[int, ...]
    cin: int
    cout: int
    full_ms: float = 0.0
    steps: dict[str, int] = field(default_factory=dict)  # dim ("in" | "out" | "dw") → step
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


@dataclass
class Touch:
    site: str
    dim: str  # "in" | "out" | "dw"
    share: float  # layer channels per group channel
    whole: bool  # the group is the layer's whole dim: its kept count is the layer's


class LatencyTable:
    def __init__(self, model: nn.Module, gs: GroupSet, example: io.Inputs, runtime: Runtime) -> None:
        self.runtime = runtime
        self.batch = runtime.settings.batch_size
        self.cache = ProbeCache(runtime.key(), hardware(runtime.settings.device))
        self.measured = self.cached = 0
        self.seconds = 0.0
        self.sites: dict[str, Site] = {}
        self.touches: dict[int, list[Touch]] = {}
        names = {id(m): n for n, m in model.named_modules()}
        shapes = _input_shapes(model, {id(m) for g in gs.groups for m, _, _ in g.members}, example)
        for g in gs.groups:
            for mod, consumes, positions in g.members:
                site = self.sites.get(names[id(mod)]) or self._site(names[id(mod)], mod, shapes.get(id(mod)))
                if site is None:
                    continue
                dim = "dw" if site.kind == "dw" else "in" if consumes else "out"
                full = site.cin if dim == "in" else site.cout
                self.touches.setdefault(g.gid, []).append(
                    Touch(site.name, dim, len(positions) / g.size, len(positions) == full == g.size))
        self.groups = {g.gid: g.size for g in gs.groups}
        self._group_steps: dict[int, int] = {}

    # sites and probes ---------------------------------------------------------------------------------
    def _site(self, name: str, mod: nn.Module, shape: tuple[int, ...] | None) -> Site | None:
        if shape is None:  # never ran on the example: nothing to time
            return None
        if isinstance(mod, nn.Linear):
            kind, cin, cout = "linear", mod.in_features, mod.out_features
        elif isinstance(mod, CONV_TYPES):
            dw = mod.groups > 1 and mod.groups == mod.in_channels
            kind = "dw" if dw else "fixed" if mod.groups > 1 else "conv"
            cin, cout = mod.in_channels, mod.out_channels
        else:
            return None
        site = Site(name, mod, kind, shape, cin, cout)
        if kind != "fixed":
            site.full_ms = self.probe(site, cin, cout)
        self.sites[name] = site
        return site

    def _key(self, site: Site, cin: int, cout: int) -> str:
        m = site.module
        geo = (m.kernel_size, m.stride, m.padding, m.dilation, m.padding_mode, m.bias is not None) \
            if isinstance(m, CONV_TYPES) else (m.bias is not None,)
        where = site.in_shape[2:] if site.kind != "linear" else site.in_shape[1:-1]
        return f"{site.kind}|{type(m).__name__}|{geo}|{where}|{cin}x{cout}"

    def probe(self, site: Site, cin: int, cout: int) -> float:
        key = self._key(site, cin, cout)
        if key in self.cache.entries:
            self.cached += 1
            return self.cache.entries[key]
        t0 = time.perf_counter()
        module, x = _probe_module(site, cin, cout, self.batch)
        ms = self.runtime.time_probe(module, x).min_ms  # the fastest run: interference only ever adds
        self.seconds += time.perf_counter() - t0
        self.measured += 1
        self.cache.entries[key] = ms
        self.cache.new += 1
        return ms

    def _at(self, site: Site, dim: str, c: int) -> float:
        if dim == "dw":
            return self.probe(site, c, c * (site.cout // site.cin))
        return self.probe(site, c, site.cout) if dim == "in" else self.probe(site, site.cin, c)

    def _full(self, site: Site, dim: str) -> int:
        return site.cout if dim == "out" else site.cin

    def step(self, site: Site, dim: str) -> int:
        if dim not in site.steps:
            size = self._full(site, dim)
            if site.kind == "fixed" or size < MIN_STEP_DIM:
                site.steps[dim] = 1
            else:
                b = 16 * max(1, int(0.75 * size) // 16)
                ref = self._at(site, dim, b)
                slow = {a: self._at(site, dim, b - a) > SLOW * ref for a in (1, 2, 4, 8)}
                step = next((a for a in ALIGNMENTS if not any(s for al, s in slow.items() if al >= a)), 16)
                site.steps[dim] = min(step, max(1, size // 4))  # a coarser step would decide the layer's width
        return site.steps[dim]

    def curve(self, site: Site, dim: str) -> list[tuple[int, float]]:
        if dim not in site.curves:
            size, s = self._full(site, dim), self.step(site, dim)
            counts = sorted({size, *(min(size, max(s, s * math.ceil(size * f / s))) for f in CURVE)})
            site.curves[dim] = [(c, site.full_ms if c == size else self._at(site, dim, c)) for c in counts]
        return site.curves[dim]

    def probe_all(self, curves: bool = True) -> None:
        """Measure every step (and curve) now, saving the cache once, so planning itself is arithmetic."""
        for gid, touches in self.touches.items():
            for t in touches:
                site = self.sites[t.site]
                if site.kind != "fixed":
                    self.step(site, t.dim)
                    if curves:
                        self.curve(site, t.dim)
            self.group_step(gid)
        self.cache.save()

    # prediction ---------------------------------------------------------------------------------------
    def group_step(self, gid: int) -> int:
        """The alignment a group's kept count is rounded up to: the largest step of the layer dims it is the
        whole of (a dim shared with other groups cannot be aligned by one of them), then checked on the group
        as a whole (``_slower_than_larger``): halved, down to 1, while a count aligned to it is slower than
        a larger one next to it, summed over those dims."""
        if gid not in self._group_steps:
            whole = [t for t in self.touches.get(gid, []) if t.whole]
            step = max([self.step(self.sites[t.site], t.dim) for t in whole] or [1])
            timed = [t for t in whole if self.sites[t.site].kind != "fixed"]
            while step > 1 and self._slower_than_larger(timed, self.groups[gid], step):
                step //= 2
            self._group_steps[gid] = step
        return self._group_steps[gid]

    def _slower_than_larger(self, timed: list[Touch], size: int, step: int) -> bool:
        """Whether a count aligned to ``step`` (at half and three quarters of the group) is more than ``SLOW``
        slower, summed over the dims the group is the whole of, than a larger count next to it. Each dim's own
        step only compares counts below a 16-aligned one, and dims can disagree: onnxruntime on an AVX-512
        Xeon ran a 1×1 conv reading 24 channels in 0.172 ms and reading 25 in 0.091 ms (a layout change
        the alone-timed probe pays for aligned inputs), while the conv producing those channels was fastest
        at multiples of 16, so its group's step of 8 landed on counts slower than one channel more."""

        def total(c: int) -> float:
            return sum(self._at(self.sites[t.site], t.dim, c) for t in timed)

        for f in (0.5, 0.75):
            b = step * max(1, round(f * size / step))
            ref = total(b) if b < size else 0.0
            if any(ref > SLOW * total(c) for c in sorted({b + 1, b + step // 2, b + step - 1}) if b < c < size):
                return True
        return False

    def _ratio(self, site: Site, dim: str, c: float) -> float:
        pts = self.curve(site, dim)
        full = pts[-1][1] or 1e-9
        xs = [p[0] for p in pts]
        if c >= xs[-1]:
            return 1.0
        if c <= xs[0]:
            return pts[0][1] / full * max(c, 0.0) / xs[0]
        i = bisect.bisect_right(xs, c)
        (x0, y0), (x1, y1) = pts[i - 1], pts[i]
        return (y0 + (y1 - y0) * (c - x0) / (x1 - x0)) / full

    def predict(self, kept: dict[int, int]) -> float:
        """Summed latency (ms) of every touched layer with these kept counts per group."""
        gone: dict[tuple[str, str], float] = {}
        for gid, k in kept.items():
            for t in self.touches.get(gid, []):
                gone[(t.site, t.dim)] = gone.get((t.site, t.dim), 0.0) + t.share * (self.groups[gid] - k)
        total = 0.0
        for site in self.sites.values():
            ms = site.full_ms
            if site.kind == "fixed":
                ms = 0.0
            for dim in ("in", "out", "dw"):
                g = gone.get((site.name, dim), 0.0)
                if g and site.kind != "fixed":
                    ms *= self._ratio(site, dim, self._full(site, dim) - g)
            total += ms
        return total

    def full(self) -> float:
        return self.predict({gid: size for gid, size in self.groups.items()})

    def slowest(self, n: int = 4) -> list[dict[str, object]]:
        """The slowest layers' measured curves, for the report's plot of latency against kept channels."""
        rows = []
        for site in sorted(self.sites.values(), key=lambda s: -s.full_ms)[:n]:
            for dim, pts in site.curves.items():
                rows.append({"layer": public_name(site.name), "dim": dim, "step": site.steps.get(dim, 1),
                             "points": [[c, round(ms, 5)] for c, ms in pts]})
        return rows

    def stats(self) -> dict[str, object]:
        return {"layers": len(self.sites), "probes_measured": self.measured, "probes_cached": self.cached,
                "probe_seconds": round(self.seconds, 2), "cache": str(self.cache.path)}


def _input_shapes(model: nn.Module, wanted: set[int], example: io.Inputs) -> dict[int, tuple[int, ...]]:
    shapes: dict[int, tuple[int, ...]] = {}

    def hook(mod: nn.Module, args: tuple) -> None:
        shapes.setdefault(id(mod), (1, *args[0].shape[1:]))

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if id(m) in wanted]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            io.call(model, io.rows(example, slice(0, 1)))
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return shapes


def _probe_module(site: Site, cin: int, cout: int, batch: int) -> tuple[nn.Module, torch.Tensor]:
    m = site.module
    g = torch.Generator().manual_seed(0)
    if site.kind == "linear":
        probe: nn.Module = nn.Linear(cin, cout, bias=m.bias is not None)
        x = torch.randn(batch, *site.in_shape[1:-1], cin, generator=g)
    else:
        groups = cin if site.kind == "dw" else 1
        probe = type(m)(cin, cout, m.kernel_size, m.stride, m.padding, m.dilation, groups,
                        bias=m.bias is not None, padding_mode=m.padding_mode)
        x = torch.randn(batch, cin, *site.in_shape[2:], generator=g)
    with torch.no_grad():
        for p in probe.parameters():  # small, normal values: no denormals or overflow in the timing
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return probe.eval(), x
