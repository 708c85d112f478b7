"""The gamma report as one self-contained HTML page (inline CSS, SVG and PNGs as data URIs; no scripts,
no fetches), so it can be saved, mailed or attached to a model review as one file.

Layer names come from an uploaded, untrusted model, so every value is escaped, and the endpoint
serves the page with a Content-Security-Policy that forbids scripts anyway.
"""

from __future__ import annotations

import base64
import json
from html import escape
from typing import Any

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}.warn{color:#a60}svg{display:block}
figure{margin:1em 0}figcaption{font-weight:600}img{max-width:100%}
.k{display:inline-block;width:10px;height:10px;margin:0 4px 0 12px}
"""


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return escape(str(value))
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list):
        return escape(json.dumps(value, separators=(", ", ": "))[:300])
    return escape(str(value))


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def histogram_svg(before: dict[str, Any], after: dict[str, Any], threshold: Any) -> str:
    """Before (grey) and after (blue) sparse training on the layer's shared bin edges."""
    c0 = [n for n in (before.get("histogram") or {}).get("counts", []) if _num(n) is not None]
    c1 = [n for n in (after.get("histogram") or {}).get("counts", []) if _num(n) is not None]
    edges = [e for e in (after.get("histogram") or {}).get("edges", []) if _num(e) is not None]
    bins = max(len(c0), len(c1))
    if not bins:
        return ""
    w, h = 200.0, 40.0
    top = max([*c0, *c1, 1])
    bw = w / bins
    bars = []
    for counts, color in ((c0, "#bbb"), (c1, "#3a7bd5")):
        for i, n in enumerate(counts):
            bh = h * n / top
            bars.append(f'<rect x="{i * bw:.1f}" y="{h - bh:.1f}" width="{bw * 0.9:.1f}" height="{bh:.1f}" '
                        f'fill="{color}" fill-opacity="0.7"/>')
    t = _num(threshold)
    if t is not None and len(edges) >= 2 and edges[-1] > edges[0]:
        x = w * (t - edges[0]) / (edges[-1] - edges[0])
        if 0 <= x <= w:
            bars.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="0" y2="{h}" stroke="#c00" stroke-width="1"/>')
    return f'<svg width="{w:.0f}" height="{h:.0f}" viewBox="0 0 {w:.0f} {h:.0f}">{"".join(bars)}</svg>'


def _stage_table(stages: dict[str, Any]) -> str:
    rows = {k: v for k, v in stages.items() if isinstance(v, dict)}
    if not rows:
        return ""
    cols: list[str] = []
    for values in rows.values():
        cols += [c for c in values if c not in cols]
    head = "".join(f"<th>{escape(str(c))}</th>" for c in cols)
    body = "".join(
        f'<tr><td class="l">{escape(str(name))}</td>' + "".join(f"<td>{_fmt(v.get(c))}</td>" for c in cols) + "</tr>"
        for name, v in rows.items()
    )
    return f'<h2>Stages</h2><table><tr><th class="l">stage</th>{head}</tr>{body}</table>'


def _layer_table(layers: list[Any], threshold: Any) -> str:
    rows = []
    for layer in layers:
        if not isinstance(layer, dict):
            continue
        g0, g1 = layer.get("gamma_before") or {}, layer.get("gamma_after") or {}
        before, after = _num(layer.get("channels_before")), _num(layer.get("channels_after"))
        removed = f"{100 * (1 - after / before):.0f}%" if before and after is not None else ""
        rows.append(
            f'<tr><td class="l">{escape(str(layer.get("name", "")))}</td><td>{_fmt(layer.get("channels_before"))}'
            f"</td><td>{_fmt(layer.get('channels_after'))}</td><td>{removed}</td><td>{_fmt(g0.get('mean'))}</td>"
            f"<td>{_fmt(g1.get('mean'))}</td><td>{_fmt(g1.get('below_threshold'))}</td>"
            f"<td>{histogram_svg(g0, g1, threshold)}</td></tr>"
        )
    if not rows:
        return ""
    return ('<h2>Layers</h2><p>|γ| histograms: <span class="k" style="background:#bbb"></span>before and '
            '<span class="k" style="background:#3a7bd5"></span>after sparse training; red line: threshold.</p>'
            '<table><tr><th class="l">layer</th><th>channels before</th><th>after</th><th>removed</th>'
            "<th>mean |γ| before</th><th>after</th><th>below threshold</th><th>histogram</th></tr>"
            + "".join(rows) + "</table>")


def _pct(before: int | float | None, after: int | float | None) -> str:
    if before is None or after is None or before == 0:
        return ""
    return f"{100 * (after - before) / before:+.1f}%"


def _summary(report: dict[str, Any]) -> str:
    """The numbers people decide on, before → after; each cell carries its raw value in ``data-value``."""
    stages = report.get("stages") if isinstance(report.get("stages"), dict) else {}
    base = stages.get("baseline") if isinstance(stages.get("baseline"), dict) else {}
    fin = stages.get("finetuned") if isinstance(stages.get("finetuned"), dict) else {}
    mb = report.get("model_bytes") if isinstance(report.get("model_bytes"), dict) else {}
    quality = "accuracy" if _num(base.get("accuracy")) is not None else "distillation_error"
    def v(d: dict[str, Any], k: str) -> int | float | None:  # ints stay ints: 122,282 parameters, not 1.223e+05
        x = d.get(k)
        return x if _num(x) is not None else None

    rows = [("model size (bytes)", "size", v(mb, "before"), v(mb, "after")),
            ("parameters", "params", v(base, "params"), v(fin, "params")),
            ("FLOPs", "flops", v(base, "flops"), v(fin, "flops")),
            ("CPU latency (ms)", "latency_ms", v(base, "latency_ms"), v(fin, "latency_ms")),
            *_runtime_row(report),
            (quality.replace("_", " "), quality, v(base, quality), v(fin, quality))]
    body = "".join(
        f'<tr><th class="l">{escape(label)}</th><td data-k="{key}-before" data-value="{b!r}">{_fmt(b)}</td>'
        f'<td data-k="{key}-after" data-value="{a!r}">{_fmt(a)}</td><td>{_pct(b, a)}</td></tr>'
        for label, key, b, a in rows if b is not None or a is not None)
    return ('<table id="summary"><tr><th class="l"></th><th>before</th><th>after</th><th>change</th></tr>'
            f"{body}</table>")


def _runtime_row(report: dict[str, Any]) -> list[tuple[str, str, Any, Any]]:
    """The latency the job measured on its target runtime (median), when it measured one."""
    lat = report.get("latency") if isinstance(report.get("latency"), dict) else {}
    st = lat.get("stages") if isinstance(lat.get("stages"), dict) else {}
    b, a = (st.get(k) if isinstance(st.get(k), dict) else {} for k in ("baseline", "finetuned"))
    if not b and not a:
        return []
    label = f"latency on {lat.get('runtime')}, {lat.get('device')}, batch {lat.get('batch_size')} (ms)"
    return [(label, "runtime_latency", _num(b.get("median_ms")), _num(a.get("median_ms")))]


def _plots(plots: dict[str, bytes]) -> str:
    if not plots:
        return '<h2>Plots</h2><p class="warn">This job stored no plots (it ran before plots existed, or drawing ' \
               "them failed: see the warnings).</p>"
    titles = {"stages": "By stage", "channels": "Channels kept per layer", "gamma": "|γ| before and after",
              "strength": "Strength search", "latency": "Latency on the target runtime"}
    imgs = "".join(f'<figure><figcaption>{escape(titles.get(n, n))}</figcaption><img alt="{escape(n)}" '
                   f'id="plot-{escape(n)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
                   f"</figure>" for n, data in plots.items())
    return f"<h2>Plots</h2>{imgs}"


def render_report(job_id: str, report: dict[str, Any], plots: dict[str, bytes] | None = None) -> str:
    """Summary first, then warnings, plots, the per-layer table and the method's details."""
    details = {k: report.get(k) for k in ("method", "threshold", "target", "format", "removed_channels",
                                          "output_deviation", "pilot", "latency", "sparse_training_stopped_early_at",
                                          "sparse_training_stopped_because") if report.get(k) is not None}
    detail_rows = "".join(f'<tr><th class="l">{escape(k)}</th><td class="l">{_fmt(v)}</td></tr>'
                          for k, v in details.items())
    warnings = [w for w in report.get("warnings") or [] if isinstance(w, str)]
    warn_html = ('<h2>Warnings</h2><ul id="warnings">' + "".join(f'<li class="warn">{escape(w)}</li>' for w in warnings)
                 + "</ul>") if warnings else '<p id="warnings">No warnings.</p>'
    stages = report.get("stages")
    layers = report.get("layers")
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>slim report {escape(job_id)}</title>'
        f"<style>{_STYLE}</style></head><body><h1>Gamma report</h1><p>job {escape(job_id)}</p>"
        f"{_summary(report)}{warn_html}{_plots(plots or {})}"
        f"{_layer_table(layers, report.get('threshold')) if isinstance(layers, list) else ''}"
        f"{_stage_table(stages) if isinstance(stages, dict) else ''}"
        f"<h2>Details</h2><table>{detail_rows}</table>"
        "</body></html>"
    )
