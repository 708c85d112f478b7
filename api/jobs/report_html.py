"""The gamma report as one self-contained HTML page (inline CSS and SVG, no scripts, no fetches).

Layer names come from an uploaded, untrusted model, so every value is escaped, and the endpoint
serves the page with a Content-Security-Policy that forbids scripts anyway.
"""

from __future__ import annotations

import json
from html import escape
from typing import Any

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}.warn{color:#a60}svg{display:block}
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


def render_report(job_id: str, report: dict[str, Any]) -> str:
    summary = {k: report.get(k) for k in ("method", "threshold", "target", "format", "model_bytes",
                                          "output_deviation") if k in report}
    summary_rows = "".join(f'<tr><th class="l">{escape(k)}</th><td class="l">{_fmt(v)}</td></tr>'
                           for k, v in summary.items())
    warnings = [w for w in report.get("warnings") or [] if isinstance(w, str)]
    warn_html = ("<h2>Warnings</h2><ul>" + "".join(f'<li class="warn">{escape(w)}</li>' for w in warnings)
                 + "</ul>") if warnings else ""
    stages = report.get("stages")
    layers = report.get("layers")
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>slim report {escape(job_id)}</title>'
        f"<style>{_STYLE}</style></head><body><h1>Gamma report</h1><p>job {escape(job_id)}</p>"
        f"<table>{summary_rows}</table>{warn_html}"
        f"{_stage_table(stages) if isinstance(stages, dict) else ''}"
        f"{_layer_table(layers, report.get('threshold')) if isinstance(layers, list) else ''}"
        "</body></html>"
    )
