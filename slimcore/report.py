"""The gamma report (JSON, version 1): what was removed, why, and what it cost.

Histograms of one layer use the same bin edges before and after sparse training, so the two can be
compared bar by bar; the edges span 0 to the largest |γ| the layer had at either time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

BINS = 20


def gamma_snapshot(bns: list[tuple[str, nn.modules.batchnorm._BatchNorm]]) -> dict[str, torch.Tensor]:
    return {name: bn.weight.detach().abs().float().cpu().clone() for name, bn in bns if bn.weight is not None}


def _stats(g: torch.Tensor, edges: torch.Tensor, threshold: float | None) -> dict[str, Any]:
    counts = torch.histogram(g, bins=edges)[0] if g.numel() else torch.zeros(BINS)
    out: dict[str, Any] = {
        "mean": float(g.mean()), "std": float(g.std()) if g.numel() > 1 else 0.0,
        "min": float(g.min()), "median": float(g.median()), "max": float(g.max()),
        "histogram": {"edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts]},
    }
    if threshold is not None:
        out["below_threshold"] = int((g < threshold).sum())
    return out


def layer_table(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor],
                channels_after: dict[str, int], threshold: float | None) -> list[dict[str, Any]]:
    rows = []
    for name, g0 in before.items():
        g1 = after.get(name, g0)
        top = max(float(g0.max()), float(g1.max()), 1e-8)
        edges = torch.linspace(0, top * 1.0001, BINS + 1)
        rows.append({
            "name": name, "channels_before": int(g0.numel()), "channels_after": channels_after.get(name, g0.numel()),
            "gamma_before": _stats(g0, edges, None), "gamma_after": _stats(g1, edges, threshold),
        })
    return rows


@dataclass
class ReportBuilder:
    method: dict[str, Any]
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def stage(self, name: str, **values: Any) -> None:
        self.stages[name] = {k: v for k, v in values.items()}

    def warn(self, msg: str) -> None:
        if msg not in self.warnings:
            self.warnings.append(msg)

    def build(self, *, threshold: float, layers: list[dict[str, Any]], model_bytes: dict[str, int],
              output_deviation: float) -> dict[str, Any]:
        return {
            "version": 1, "method": self.method, "threshold": threshold, "layers": layers, "stages": self.stages,
            "model_bytes": model_bytes, "output_deviation": output_deviation, "warnings": self.warnings,
            **self.extra,
        }


REMOVAL_BOUND = 0.03  # accuracy the removal itself may cost (sparse → pruned) before the report says so


def removal_cost(rb: ReportBuilder, culprits: list[dict[str, Any]]) -> dict[str, Any]:
    """What removing the channels cost by itself (sparse → pruned, before fine-tuning), with the layers whose
    removed channels were least near zero; a warning naming them when the cost is over ``REMOVAL_BOUND``."""
    sparse, pruned = rb.stages.get("sparse", rb.stages.get("baseline", {})), rb.stages.get("pruned", {})
    key = "accuracy" if sparse.get("accuracy") is not None else "distillation_error"
    a, b = sparse.get(key), pruned.get(key)
    cost = None if a is None or b is None else (a - b if key == "accuracy" else b - a)
    if cost is not None and key == "accuracy" and cost > REMOVAL_BOUND and culprits:
        names = ", ".join(f"{c['layer']} (removed up to {c['relative']:.0%} of its largest kept importance)"
                          if c["relative"] is not None else c["layer"] for c in culprits[:3])
        rb.warn(f"removing the channels itself cost {cost:.3f} accuracy ({a:.3f} → {b:.3f}) before fine-tuning; "
                f"the removed channels were furthest from zero in {names}: prune.ignore them, lower the amount "
                f"or train the sparsity longer")
    return {"measure": key, "before_removal": a, "after_removal": b, "cost": cost, "bound": REMOVAL_BOUND,
            "culprits": culprits}
