"""What ``slim submit --wait`` shows: one progress bar per phase (epoch, loss, ETA), then a summary table.

On a terminal the current phase's bar is redrawn in place and each finished phase keeps its line; into a
pipe or a log file, a line is written per phase change and per tenth of a phase, so CI logs stay short.
Everything goes to stderr: stdout keeps the machine-readable job record.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

PHASES = ("importing", "sparse_training", "pruning", "finetuning", "exporting")
_EPOCH_PHASES = {"sparse_training": "sparse_training", "finetuning": "finetune"}
WIDTH = 24


def _clock(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class ProgressView:
    def __init__(self, stream: TextIO | None = None, tty: bool | None = None) -> None:
        self.out = stream or sys.stderr
        self.tty = self.out.isatty() if tty is None else tty
        self.phase: str | None = None
        self.started = time.monotonic()
        self.last_line = ""
        self.last_tenth = -1
        self.status: str | None = None

    def phase_fraction(self, job: dict[str, Any]) -> float | None:
        """Progress inside the current phase: epochs done ÷ epochs planned for training phases."""
        m = job.get("metrics") or {}
        key = _EPOCH_PHASES.get(job.get("phase") or "")
        if key is None:
            return None
        total = ((job.get("spec") or {}).get(key) or {}).get("epochs")
        if not total or "epoch" not in m:
            return None
        return max(0.0, min(float(m["epoch"]) / float(total), 1.0))

    def line(self, job: dict[str, Any]) -> str:
        phase = job.get("phase") or job.get("status") or ""
        frac = self.phase_fraction(job)
        m = job.get("metrics") or {}
        if frac is None:
            frac = 1.0 if job.get("status") == "succeeded" else 0.0
        done = int(round(frac * WIDTH))
        parts = [f"{phase:<16}", "[" + "#" * done + "-" * (WIDTH - done) + "]", f"{100 * frac:5.1f}%"]
        key = _EPOCH_PHASES.get(phase)
        if key and "epoch" in m:
            total = ((job.get("spec") or {}).get(key) or {}).get("epochs")
            parts.append(f"epoch {float(m['epoch']):.1f}/{total}")
        if "pilot_run" in m:
            parts.append(f"strength pilot run {m['pilot_run']}")
        if isinstance(m.get("loss"), int | float):
            parts.append(f"loss {float(m['loss']):.4g}")
        elapsed = time.monotonic() - self.started
        if 0.02 < frac < 1.0:
            parts.append(f"ETA {_clock(elapsed / frac * (1 - frac))}")
        elif frac >= 1.0:
            parts.append(f"took {_clock(elapsed)}")
        return "  ".join(parts)

    def update(self, job: dict[str, Any]) -> None:
        phase = job.get("phase")
        if job.get("status") == "queued":
            if self.status != "queued":
                self._print("queued: waiting for a worker", final=True)
            self.status = "queued"
            return
        self.status = job.get("status")
        if phase != self.phase:
            self._close_phases(job, upto=phase)
            self.phase, self.started, self.last_tenth = phase, time.monotonic(), -1
        text = self.line(job)
        if self.tty:
            self._print(text, final=False)
            return
        frac = self.phase_fraction(job) or 0.0
        tenth = int(frac * 10)
        if tenth != self.last_tenth:
            self.last_tenth = tenth
            self._print(text, final=True)

    def _close_phases(self, job: dict[str, Any], upto: str | None) -> None:
        """Mark the current phase, and any the updates skipped over (a short phase can start and end between
        two snapshots), as done, each on its own line."""
        order = list(PHASES)
        start = order.index(self.phase) if self.phase in order else None
        end = order.index(upto) if upto in order else len(order)
        if start is None:
            return
        for name in order[start:end]:
            if name == self.phase and not self.tty and self.last_tenth >= 10:
                continue  # already written as complete
            self.started = self.started if name == self.phase else time.monotonic()
            self._print(self.line({**job, "phase": name, "metrics": {}, "status": "succeeded"}), final=True)

    def finish(self, job: dict[str, Any]) -> None:
        if job.get("status") == "succeeded":
            self._close_phases(job, upto=None)
            self.phase = None
        elif self.tty and self.last_line:
            self._print(self.last_line, final=True)

    def _print(self, text: str, final: bool) -> None:
        if self.tty:
            pad = max(len(self.last_line) - len(text), 0)
            self.out.write("\r" + text + " " * pad + ("\n" if final else ""))
        else:
            self.out.write(text + "\n")
        self.last_line = "" if final else text
        self.out.flush()


def summary_table(job: dict[str, Any]) -> str:
    """Before → after for the numbers people ship on, from the job's ``summary``."""
    s = job.get("summary") or {}
    before, after = s.get("before") or {}, s.get("after") or {}
    mb = s.get("model_bytes") or {}
    rows = [("model size (bytes)", mb.get("before"), mb.get("after")),
            ("parameters", before.get("params"), after.get("params")),
            ("FLOPs", before.get("flops"), after.get("flops")),
            ("CPU latency (ms)", before.get("latency_ms"), after.get("latency_ms"))]
    if before.get("accuracy") is not None:
        rows.append(("accuracy", before.get("accuracy"), after.get("accuracy")))
    if before.get("distillation_error") is not None:
        rows.append(("distillation error", before.get("distillation_error"), after.get("distillation_error")))

    def fmt(v: Any) -> str:
        if isinstance(v, bool) or v is None:
            return "–"
        if isinstance(v, int):
            return f"{v:,}"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    def change(b: Any, a: Any) -> str:
        if isinstance(b, int | float) and isinstance(a, int | float) and b:
            return f"{100 * (a - b) / b:+.1f}%"
        return ""

    table = [("", "before", "after", "change")] + [(n, fmt(b), fmt(a), change(b, a)) for n, b, a in rows]
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    lines = ["  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)) for r in table]
    for w in s.get("warnings") or []:
        lines.append(f"warning: {w}")
    return "\n".join(lines)
