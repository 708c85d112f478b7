"""The gamma report drawn as PNGs (matplotlib, Agg): what people look at before shipping a slimmed model.

Torch-free on purpose: it reads only the report dict, so the worker draws after the job, ``slim run
--plots DIR`` draws locally, and a report from an older run can be drawn again.

Up to four figures (``PLOTS``):
- ``gamma``: per layer, the |γ| histogram before (grey) and after (blue) sparse training on the layer's
  shared bin edges, with the pruning threshold as a red line. Up to ``MAX_LAYERS`` layers, the largest
  first, so a ResNet-152 stays readable; the title says when layers were left out.
- ``channels``: channels per layer before vs after, as horizontal bars.
- ``stages``: accuracy (or distillation error), parameters, FLOPs and CPU latency for each stage.
- ``strength``: only when the job searched its strength: the controller's strength and share of channels
  near zero against the schedule (with the goal ramp), or the pilot's tries (strength against share).
- ``latency``: only when the job measured a runtime (a latency target or ``round_to: "auto"``): the
  slowest layers' latency against kept channels as measured there (dots: the probes; the dotted line:
  the layer's fast step), and the closed loop's predicted and measured ratio per try against the target.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

PLOTS = ("stages", "channels", "gamma", "strength", "latency")  # the order the report page shows them in
MAX_LAYERS = 48
STAGE_ORDER = ("baseline", "sparse", "pruned", "finetuned")


def backend() -> Any:
    """matplotlib's pyplot on the Agg backend (no display, no GUI threads, so a process may import it and fork:
    ``slim worker`` does, so each job's child need not)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    backend().close(fig)
    return buf.getvalue()


def _layers(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [lay for lay in report.get("layers") or [] if isinstance(lay, dict) and "name" in lay]


def gamma_png(report: dict[str, Any]) -> bytes:
    plt = backend()
    layers = _layers(report)
    shown = sorted(layers, key=lambda lay: -int(lay.get("channels_before") or 0))[:MAX_LAYERS]
    shown.sort(key=layers.index)
    cols = min(4, max(1, len(shown)))
    rows = max(1, math.ceil(len(shown) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 1.9 * rows + 0.6), squeeze=False)
    thr = report.get("threshold")
    for ax, lay in zip(axes.flat, shown, strict=False):
        for key, color, label in (("gamma_before", "#9a9a9a", "before"), ("gamma_after", "#3a7bd5", "after")):
            h = (lay.get(key) or {}).get("histogram") or {}
            edges, counts = h.get("edges") or [], h.get("counts") or []
            if len(edges) == len(counts) + 1 and counts:
                ax.stairs(counts, edges, fill=True, alpha=0.55, color=color, label=label)
        if isinstance(thr, int | float):
            ax.axvline(float(thr), color="#c00", lw=1, label="threshold")
        ax.set_title(f"{lay['name']}  {lay.get('channels_before')}→{lay.get('channels_after')}", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    if shown:
        axes.flat[0].legend(fontsize=7, frameon=False)
    more = f" ({len(shown)} of {len(layers)} layers, the widest)" if len(shown) < len(layers) else ""
    fig.suptitle(f"|γ| per layer before and after sparse training{more}", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def channels_png(report: dict[str, Any]) -> bytes:
    plt = backend()
    layers = _layers(report)
    names = [str(lay["name"]) for lay in layers]
    before = [int(lay.get("channels_before") or 0) for lay in layers]
    after = [int(lay.get("channels_after") or 0) for lay in layers]
    fig, ax = plt.subplots(figsize=(7, 0.22 * len(layers) + 1.2))
    y = list(range(len(layers)))
    ax.barh(y, before, color="#cfcfcf", label="before")
    ax.barh(y, after, color="#3a7bd5", label="after")
    ax.set_yticks(y, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("channels")
    kept = sum(after) / max(sum(before), 1)
    ax.set_title(f"channels kept per layer: {sum(after):,} of {sum(before):,} ({kept:.0%})", fontsize=10)
    ax.legend(fontsize=8, frameon=False, loc="lower right")
    fig.tight_layout()
    return _png(fig)


def stages_png(report: dict[str, Any]) -> bytes:
    plt = backend()
    stages = report.get("stages") or {}
    names = [s for s in STAGE_ORDER if isinstance(stages.get(s), dict)]
    names += [s for s in stages if s not in names and isinstance(stages[s], dict)]
    quality = "accuracy" if any(stages[s].get("accuracy") is not None for s in names) else "distillation_error"
    panels = [(quality, quality.replace("_", " ")), ("params", "parameters"), ("flops", "FLOPs"),
              ("latency_ms", "CPU latency (ms)")]
    fig, axes = plt.subplots(1, 4, figsize=(12, 2.8))
    for ax, (key, label) in zip(axes, panels, strict=True):
        vals = [stages[s].get(key) for s in names]
        xs = [i for i, v in enumerate(vals) if isinstance(v, int | float)]
        ax.bar(xs, [float(vals[i]) for i in xs], color=["#9a9a9a" if names[i] == "baseline" else "#3a7bd5"
                                                      for i in xs])
        for i in xs:
            v = float(vals[i])
            ax.annotate(f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3g}".replace("e+0", "e"), (i, v),
                        ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(names)), names, fontsize=7, rotation=20)
        ax.set_title(label, fontsize=9)
        ax.tick_params(labelsize=7)
    fig.suptitle("by stage", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def strength_png(report: dict[str, Any]) -> bytes | None:
    """The strength search, or None when the job did not search (a strength was given)."""
    ctl, pilot = report.get("strength_control") or {}, report.get("pilot") or {}
    plt = backend()
    if ctl.get("used") and ctl.get("trajectory"):
        rows = ctl["trajectory"]
        t = [r["progress"] for r in rows]
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 2.8))
        a.semilogy(t, [max(r["strength"], 1e-12) for r in rows], color="#3a7bd5")
        a.set_title("strength (log)", fontsize=9)
        b.plot(t, [r["near_zero"] for r in rows], color="#3a7bd5", label="near zero")
        b.plot(t, [r["goal"] for r in rows], color="#9a9a9a", linestyle="--", label="goal")
        damaged = [r["progress"] for r in rows if "damage" in str(r.get("action", ""))]
        for x in damaged:
            b.axvline(x, color="#d0021b", linewidth=0.6)
        b.set_title("share of channels near zero (red: damage guard)", fontsize=9)
        b.legend(fontsize=7)
        for ax in (a, b):
            ax.set_xlabel("share of the sparse-training schedule", fontsize=8)
            ax.tick_params(labelsize=7)
        fig.suptitle("strength controller", fontsize=10)
    elif pilot.get("used") and pilot.get("tries"):
        tries = pilot["tries"]
        fig, ax = plt.subplots(figsize=(5, 2.8))
        ax.set_xscale("log")
        for r in tries:
            ax.scatter([r["strength"]], [r["sparsity"]], color="#d0021b" if r.get("damaged") else "#3a7bd5")
        if pilot.get("wanted_fraction") is not None:
            ax.axhline(pilot["wanted_fraction"], color="#9a9a9a", linestyle="--")
        ax.set_xlabel("strength", fontsize=8)
        ax.set_ylabel("share near zero", fontsize=8)
        ax.tick_params(labelsize=7)
        fig.suptitle("strength pilot (red: damaged)", fontsize=10)
    else:
        return None
    fig.tight_layout()
    return _png(fig)


def latency_png(report: dict[str, Any]) -> bytes | None:
    """The measured latency table and the closed loop, or None when no runtime was measured."""
    lat = report.get("latency") or {}
    curves, its = lat.get("layers") or [], lat.get("iterations") or []
    if not curves and not its:
        return None
    plt = backend()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 2.8))
    for row in curves:
        pts = row["points"]
        a.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3,
               label=f"{row['layer']} ({row['dim']}, step {row['step']})")
    a.set_xlabel("kept channels", fontsize=8)
    a.set_ylabel("ms", fontsize=8)
    a.set_title(f"slowest layers on {lat.get('runtime')} ({lat.get('device')}, batch {lat.get('batch_size')})",
                fontsize=9)
    if curves:
        a.legend(fontsize=6)
    if its:
        n = list(range(1, len(its) + 1))  # tries, then "confirm" (the kept plan timed again)
        b.plot(n, [i["predicted"] for i in its], marker="o", color="#9a9a9a", label="predicted")
        b.plot(n, [i["measured"] for i in its], marker="o", color="#3a7bd5", label="measured")
        target = (lat.get("target") or {}).get("requested_ratio")
        if target is not None:
            b.axhline(target, color="#d0021b", linestyle="--", linewidth=0.8, label="target")
        b.set_xlabel("try", fontsize=8)
        b.set_xticks(n, [str(i["iteration"]) for i in its])
        b.set_title("latency ratio to the original", fontsize=9)
        b.legend(fontsize=7)
    for ax in (a, b):
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return _png(fig)


_DRAW = {"gamma": gamma_png, "channels": channels_png, "stages": stages_png, "strength": strength_png,
         "latency": latency_png}


def render_plots(report: dict[str, Any]) -> dict[str, bytes]:
    """Every plot that applies as PNG bytes, by name (``PLOTS`` order; ``strength`` only after a search,
    ``latency`` only when a runtime was measured)."""
    drawn = {name: _DRAW[name](report) for name in PLOTS}
    return {name: png for name, png in drawn.items() if png is not None}


def write_plots(report: dict[str, Any], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for name, data in render_plots(report).items():
        p = directory / f"{name}.png"
        p.write_bytes(data)
        out.append(p)
    return out
