"""Finding the strength inside the one sparse-training run: a controller on the share of channels near zero.

Why: a user rarely knows a good λ (ρ, κ). The multi-run pilot (slimcore/strength.py) cost up to 5× the
training asked for and still missed the wanted sparsity on short schedules, because a strength that is
right for a short run is not right for a long one (the penalty's fight with the loss is not linear in
steps). Growing regularization (Wang et al., ICLR 2021) raises the penalty during one run instead; this
closes the loop on what the prune step needs: the wanted fraction of channels near zero when training ends.

How (details on :class:`StrengthController`):
- The wanted share is the prune target's share plus ``MARGIN``, so the cut falls inside channels that are
  already near zero. It should be reached by ``RAMP_END`` (70%) of the schedule; the last 30% consolidates
  at the strength reached (the loss repairs the network around the channels that went).
- Every ``check_every`` optimizer steps (about ``CHECKS`` times a run, one host sync each) the strength is
  set to a feed-forward term — the strength whose push alone brings the channel at the wanted rank down to
  the near-zero cut before the ramp ends, from the importances as they are now and the learning rate left
  — times a gain that grows (×``GAIN``) while that channel lags its planned path and shrinks when it runs
  ahead. Multiplicative, since good strengths span decades across models and schedules; capped at
  ``CAP`` × the first value.
- "Near zero" for the share is relative to the channel's own group (under ``RELATIVE`` × its largest
  importance; ISTA: also exactly zero), because BatchNorm before a conv is scale-invariant.
- A damage guard: about ``EVALS`` times a run it evaluates 256 validation samples (accuracy, or minus the
  distillation error). Worse than at the start by more than ``DAMAGE`` → the gain is halved, and no raise
  happens until a reading is sound again.
- Works for every method through ``Method.strength`` (read by each method's per-step hook), with a rough
  per-method push factor (``_PUSH``) that the gain corrects.

The report's ``strength_control`` holds the settings and the trajectory (progress, strength, gain, share
near zero, goal, and the guard's readings), drawn in the ``strength`` plot.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .methods import Method

RAMP_END = 0.7
MARGIN = 0.02
TOL = 0.02
GAIN = 1.5
CHECKS = 100
EVALS = 10
CAP = 100.0  # the strength never exceeds this multiple of its first value (a runaway wrecks the network)
RELATIVE = 0.1  # a channel is near zero under this fraction of its group's largest importance
DAMAGE = 0.05  # accuracy points (classification) or relative squared output error (distillation)
# How hard each method's penalty pushes per unit strength compared with L1's sign(γ): polarization's net
# push on a small γ is λ(t − 1) = 0.2λ at t = 1.2; ISTA's step lr·ρ·λ_l has λ_l ≈ 5–15 (FINDINGS);
# receding moves w in logit space, ~0.1κ per unit, over a distance ~5 (strength.py's _DISTANCE).
_PUSH = {"polarization": 0.2, "ista": 10.0, "receding": 0.02}


class StrengthController:
    """Steers ``method.strength`` during one run; ``tick()`` after every optimizer step.

    The strength is a feed-forward term times an adapted gain ``k``. Feed-forward: the strength whose push
    alone moves the channel at the wanted rank (importance ``γ_w``) down to the near-zero cut by the end of
    the ramp, ``(γ_w − cut) / (push · Σ lr_eff)`` over the steps left (``cut`` itself once γ_w is below it, so
    the penalty keeps holding the channels down while the rest consolidates). It shrinks by itself as the
    channels arrive, which is what keeps a lagging response from overshooting. The gain absorbs what the
    model does not say (the loss resisting, the method's true push): behind the goal → ``k`` grows by up
    to ×``GAIN`` per check, ahead → it shrinks, damage → halved.

    ``quality()`` returns the guard's reading, higher = better (accuracy, or minus the distillation error),
    or None when there is nothing to measure (then only sparsity steers). ``lr_at(step)`` is the trainer's
    schedule, ``lr_gain`` its momentum factor 1/(1 − m) (1 for ISTA's momentum-free γ step).
    """

    def __init__(self, method: Method, groups: Any, *, name: str, wanted: float, threshold: float,
                 total_steps: int, lr_at: Callable[[int], float], lr_gain: float = 1.0,
                 quality: Callable[[], float | None] | None = None, start_step: int = 0,
                 state: dict[str, Any] | None = None) -> None:
        import numpy as np

        self.method, self.groups = method, groups
        self.wanted = min(max(wanted, 0.0) + MARGIN, 0.99)
        st = state or {}
        self.threshold = float(st.get("threshold", threshold))  # a resumed run keeps its first cut
        self.total = max(1, total_steps)
        self.ramp_steps = max(1, round(RAMP_END * self.total))
        self.check_every = max(1, self.total // CHECKS)
        self.eval_every = max(self.check_every, self.total // EVALS)
        self.push = _PUSH.get(name, 1.0)
        self.cum_lr = np.cumsum(np.fromiter((lr_at(s) * lr_gain for s in range(self.total)), float, self.total))
        self.quality = quality
        self.step = start_step
        self.k = float(st.get("k", 1.0))
        self.q0: float | None = st.get("q0")
        self.damaged = bool(st.get("damaged", False))
        self.held: tuple[float, float] | None = tuple(st["held"]) if st.get("held") else None  # type: ignore[assignment]
        self.trajectory: list[dict[str, Any]] = list(st.get("trajectory", []))
        if self.q0 is None and quality is not None:
            self.q0 = quality()
        imp0 = self._importance()
        self.gw0 = float(st.get("gw0", self._rank_importance(imp0)))
        self.strength = float(st["strength"]) if "strength" in st else self._feed_forward(imp0)
        self.first = float(st.get("first", self.strength))
        self.method.strength = self.strength

    def goal(self, progress: float) -> float:
        return self.wanted * min(1.0, progress / RAMP_END)

    def _importance(self) -> Any:
        return self.method.channel_importance(self.groups)

    def _lr_sum(self, start: int, end: int) -> float:
        end = min(end, self.total)
        if end <= start:
            return float(self.cum_lr[-1] - self.cum_lr[-2]) if self.total > 1 else float(self.cum_lr[-1])
        return float(self.cum_lr[end - 1] - (self.cum_lr[start - 1] if start > 0 else 0.0))

    def _share(self, imp: Any) -> float:
        """Share of channels near zero *within their group*: under ``RELATIVE`` × the group's largest importance
        (or under the absolute cut). A BatchNorm followed by a conv is scale-invariant, so the penalty can
        shrink a whole layer's γ below any absolute cut while every channel still matters; only channels small
        next to their layer's strongest go without cost."""
        import torch

        if not imp.numel():
            return 0.0
        sizes = [g.size for g in self.groups.groups]
        top = torch.cat([part.max().expand(part.numel()) for part in imp.split(sizes)]) if sizes else imp
        small = (imp < RELATIVE * top) | (imp == 0)
        if self.method.exact_zeros:
            small &= imp < self.threshold
        return float(small.float().mean())

    def _rank_importance(self, imp: Any) -> float:
        """Importance of the channel at the wanted rank (the one the cut must reach)."""
        import torch

        return float(torch.quantile(imp.float(), min(self.wanted, 1.0))) if imp.numel() else 0.0

    def _plan(self, step: int) -> float:
        """Where the wanted-rank importance should be at ``step``: from its start down to the cut, in
        proportion to the learning rate spent (the penalty moves γ per unit of lr), by the end of the ramp."""
        done = self._lr_sum(0, min(step, self.ramp_steps)) / max(self._lr_sum(0, self.ramp_steps), 1e-12)
        return self.gw0 + (self.threshold - self.gw0) * min(1.0, done)

    def _feed_forward(self, imp: Any) -> float:
        gw = self._rank_importance(imp)
        # never plan to arrive sooner than a fifth of the schedule ahead: the steps left in the ramp shrink to
        # nothing at its end, and a strength computed for them would spike and collapse the network
        end = max(self.ramp_steps, self.step + max(self.check_every, self.total // 5))
        span = self._lr_sum(self.step, end)
        distance = max(gw - self.threshold, self.threshold, 1e-8)
        return min(10.0, self.k * distance / max(self.push * span, 1e-12))

    def tick(self) -> None:
        self.step += 1
        if self.step % self.check_every and self.step != self.total:
            return
        t = self.step / self.total
        imp = self._importance()
        share = self._share(imp)
        q = self.quality() if self.quality is not None and (self.step % self.eval_every == 0
                                                           or self.step == self.total) else None
        goal = self.goal(t)
        row: dict[str, Any] = {"progress": round(t, 4), "strength": float(f"{self.strength:.4g}"),
                               "near_zero": round(share, 4), "goal": round(goal, 4)}
        if q is not None:
            row["quality"] = round(q, 4)
        gw = self._rank_importance(imp)
        plan = self._plan(self.step)
        row["wanted_rank_importance"] = float(f"{gw:.4g}")
        if q is not None and self.q0 is not None:
            self.damaged = q < self.q0 - DAMAGE
        if q is not None and self.damaged:
            self.k *= 0.5
            row["action"] = "damage: gain halved"
        else:
            slack = 0.1 * max(self.gw0 - self.threshold, self.threshold)
            ramp = self.step < self.ramp_steps
            behind = gw > plan + slack if ramp else share < self.wanted - TOL
            ahead = (gw < plan - slack or share > goal + 2 * TOL) if ramp else share > self.wanted + 2 * TOL
            if behind and not self.damaged:  # no raise until the guard reads the model as sound again
                self.k *= GAIN
                row["action"] = "raise"
            elif ahead:
                self.k /= GAIN
                row["action"] = "lower"
        self.k = min(max(self.k, 1e-4), 1e4)
        if self.step < self.ramp_steps:
            self.strength = self._feed_forward(imp)
            self.held = None
        else:  # consolidation: the strength reached at the ramp's end, only scaled by the gain's changes since
            if self.held is None:
                self.held = (self.strength, self.k)
            self.strength = min(10.0, self.held[0] * self.k / self.held[1])
        self.strength = min(self.strength, CAP * self.first)
        row["gain"] = float(f"{self.k:.4g}")
        self.method.strength = self.strength
        self.trajectory.append(row)

    def state(self) -> dict[str, Any]:
        """What a resumed run needs to continue steering (kept in the checkpoint)."""
        return {"strength": self.strength, "k": self.k, "q0": self.q0, "damaged": self.damaged, "first": self.first,
                "gw0": self.gw0, "held": self.held, "threshold": self.threshold, "trajectory": self.trajectory}

    def record(self) -> dict[str, Any]:
        final = self.trajectory[-1] if self.trajectory else {}
        return {"used": True, "wanted_fraction": round(self.wanted - MARGIN, 4), "aim": round(self.wanted, 4),
                "sparsity_threshold": self.threshold, "start_strength": float(f"{self.first:.4g}"),
                "final_strength": float(f"{self.strength:.4g}"), "near_zero_reached": final.get("near_zero"),
                "checks": len(self.trajectory), "check_every_steps": self.check_every,
                "ramp_end": RAMP_END, "damage_bound": DAMAGE, "baseline_quality": self.q0,
                "trajectory": self.trajectory}


class Steered:
    """A method whose strength a controller steers, as the trainer sees it: the same hooks, plus a tick
    after each step (a plain wrapper, not a Method subclass, so no class default shadows the inner's)."""

    def __init__(self, inner: Method, controller: StrengthController) -> None:
        self.inner, self.controller = inner, controller

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def param_groups(self, model: Any) -> list[dict[str, Any]]:
        return self.inner.param_groups(model)

    def after_backward(self) -> None:
        self.inner.after_backward()

    def after_step(self, lr: float) -> None:
        self.inner.after_step(lr)
        self.controller.tick()



def make_controller(model: Any, method: Method, spec: Any, data: Any, gs: Any, example: Any, *, device: Any,
                    teacher: Any, state: dict[str, Any] | None = None,
                    start_epoch: int = 0) -> tuple[StrengthController | None, dict[str, Any]]:
    """The controller for a job whose spec leaves the strength to ``search: control`` (call it after
    ``method.prepare``), or None and the report's reason. ``state`` resumes one from a checkpoint."""
    from . import io
    from .data import make_loader
    from .strength import wanted_fraction
    from .train import _lr_at as lr_at
    from .train import evaluate

    train, how = spec.sparse_training, spec.method.strength_search()
    if how != "control":
        why = {"given": "the spec gives method.strength", "pilot": "method.search is 'pilot'",
               "none": "method.search is 'none' (or pilot_runs 0): the paper's default strength"}[how]
        return None, {"used": False, "why": why}
    if train.epochs == 0:
        return None, {"used": False, "why": "no sparse training (sparse_training.epochs is 0)"}
    frac = wanted_fraction(model, gs, spec, example)
    if frac is None or frac <= 0:
        return None, {"used": False, "why": f"prune.target '{spec.prune.target}' sets its own cut, not a "
                                            f"fraction: the paper's default strength"}
    per_epoch = len(make_loader(data.x_train, None, train.batch_size, shuffle=True, seed=spec.seed))
    total = train.epochs * per_epoch
    imp = method.channel_importance(gs)
    threshold = method.near_zero if method.exact_zeros else 0.1 * float(imp.median())
    gain = 1.0 if spec.method.name == "ista" or train.optimizer != "sgd" else 1 / max(1e-3, 1 - train.momentum)
    val_x = io.rows(data.x_val, slice(0, 256))
    val_y = data.y_val[:256] if data.y_val is not None else None

    def quality() -> float | None:
        if spec.task == "classification" and val_y is not None:
            return evaluate(model, val_x, val_y, task="classification", device=device).accuracy
        ev = evaluate(model, val_x, None, task="distillation", teacher=teacher, device=device)
        return None if ev.distill_error is None else -ev.distill_error

    return StrengthController(method, gs, name=spec.method.name, wanted=frac, threshold=threshold,
                              total_steps=total, lr_at=lambda it: lr_at(train, it, total), lr_gain=gain,
                              quality=quality, start_step=start_epoch * per_epoch, state=state), {}
