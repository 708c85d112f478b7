"""The report's plots and the terminal progress display, on reports and job records made here."""

from __future__ import annotations

import io

from PIL import Image

from api.progress import ProgressView, summary_table
from slimcore.plots import MAX_LAYERS, PLOTS, render_plots


def _report(n_layers: int, task: str = "classification") -> dict:
    edges = [i / 10 for i in range(11)]
    layers = [{"name": f"layer{i}", "channels_before": 16 + i, "channels_after": 8,
               "gamma_before": {"histogram": {"edges": edges, "counts": [0] * 8 + [10, 6]}},
               "gamma_after": {"histogram": {"edges": edges, "counts": [8, 0, 0, 0, 0, 0, 0, 0, 4, 4]}}}
              for i in range(n_layers)]
    q = "accuracy" if task == "classification" else "distillation_error"
    stages = {s: {q: 0.9 - 0.1 * i, "params": 1000 - 100 * i, "flops": 5000 - 800 * i, "latency_ms": 1.0 - 0.1 * i}
              for i, s in enumerate(("baseline", "sparse", "pruned", "finetuned"))}
    return {"layers": layers, "stages": stages, "threshold": 0.15, "model_bytes": {"before": 4000, "after": 1500}}


def test_plots_are_pngs_sized_to_their_content():
    small, big = render_plots(_report(4)), render_plots(_report(120))
    assert list(small) == [p for p in PLOTS if p not in ("strength", "latency")]  # no search, no runtime timed
    for plots in (small, big):
        for data in plots.values():
            assert data.startswith(b"\x89PNG")
    h_small = Image.open(io.BytesIO(small["gamma"])).size[1]
    h_big = Image.open(io.BytesIO(big["gamma"])).size[1]
    assert h_big > 5 * h_small  # one row per four layers…
    assert h_big < 20 * h_small  # …but capped at MAX_LAYERS
    assert MAX_LAYERS < 120
    assert Image.open(io.BytesIO(big["channels"])).size[1] > Image.open(io.BytesIO(small["channels"])).size[1]
    assert render_plots(_report(2, task="distillation"))["stages"].startswith(b"\x89PNG")


def test_strength_plot_only_after_a_search():
    base = _report(3)
    assert "strength" not in render_plots({**base, "pilot": {"used": False}})
    rows = [{"progress": t / 10, "strength": 0.01 * (1 + t), "near_zero": t / 20, "goal": min(0.52, t / 14),
             **({"action": "damage: gain halved"} if t == 5 else {})} for t in range(1, 11)]
    ctl = render_plots({**base, "strength_control": {"used": True, "trajectory": rows}})
    tries = [{"strength": s, "sparsity": f, "damaged": s > 1} for s, f in ((0.01, 0.1), (0.1, 0.45), (3.0, 0.9))]
    pilot = render_plots({**base, "pilot": {"used": True, "tries": tries, "wanted_fraction": 0.5}})
    for plots in (ctl, pilot):
        assert list(plots) == [p for p in PLOTS if p != "latency"] and plots["strength"].startswith(b"\x89PNG")
    assert Image.open(io.BytesIO(ctl["strength"])).size[0] > Image.open(io.BytesIO(pilot["strength"])).size[0]


def _job(phase: str | None, epoch: float | None = None, status: str = "running") -> dict:
    return {"id": "j1", "status": status, "phase": phase, "metrics": {} if epoch is None else
            {"epoch": epoch, "loss": 0.25}, "spec": {"sparse_training": {"epochs": 4}, "finetune": {"epochs": 2}},
            "summary": {"before": {"params": 1000, "accuracy": 0.99}, "after": {"params": 400, "accuracy": 0.98},
                        "model_bytes": {"before": 4000, "after": 1600}, "warnings": ["careful"]}}


def test_progress_on_a_terminal_redraws_and_keeps_one_line_per_phase():
    out = io.StringIO()
    v = ProgressView(out, tty=True)
    for j in (_job("importing"), _job("sparse_training", 1.0), _job("sparse_training", 2.0),
              _job("exporting")):  # pruning and finetuning came and went between two snapshots
        v.update(j)
    v.finish(_job("exporting", status="succeeded"))
    text = out.getvalue()
    assert "\r" in text and "epoch 2.0/4" in text and "loss 0.25" in text and "ETA " in text
    finished = [line.split("\r")[-1] for line in text.split("\n") if line.strip()]
    assert [f.split()[0] for f in finished] == ["importing", "sparse_training", "pruning", "finetuning", "exporting"]
    assert all("100.0%" in f for f in finished)


def test_progress_into_a_log_writes_few_plain_lines_and_the_summary_table():
    out = io.StringIO()
    v = ProgressView(out, tty=False)
    for e in (0.5, 0.6, 0.7, 2.0, 2.1, 4.0):
        v.update(_job("sparse_training", e))
    assert "\r" not in out.getvalue()
    assert len(out.getvalue().splitlines()) == 3  # one per tenth reached: 1, 5 and 10
    table = summary_table(_job("exporting", status="succeeded"))
    assert "parameters" in table and "-60.0%" in table and "warning: careful" in table
