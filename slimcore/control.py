"""Finding the strength inside the one sparse-training run: a controller on the share of channels near zero.

Why: a user rarely knows a good λ (ρ, κ). The multi-run pilot (slimcore/strength.py) cost up to 5× the
training asked for and still missed the wanted sparsity on short schedules, because a strength that is
right for a short run is not right for a long one (the penalty's fight with the loss is not linear in
steps). Growing regularization (Wang et al., ICLR 2021) raises the penalty during one run instead; this
closes the loop on what the prune step needs: the wanted fraction of channels near zero when training ends.

How (details on :class:`StrengthController`):
- The wanted share is the prune target's share plus ``MARGIN``, so the cut falls inside channels that are
  already near zero. Since the penalty spares a share of every layer (below), a params,
  FLOPs or latency target's share is the one a uniform cut needs (``strength.wanted_fraction``), since
  that is where the channels near zero will lie. It should be reached by ``RAMP_END`` (70%) of the
  schedule; the last 30% consolidates at the strength reached (the loss repairs the network around the
  channels that went).
- The strength starts at the method's own default and grows (×1.3 at most per check, about ``CHECKS``
  checks a run, one host sync each, and at most ×``GROWTH`` between two guard readings) while the
  wanted-rank channel lags its planned path; it eases off when ahead. Multiplicative, since good strengths
  span decades across models and schedules.
- "Near zero" is relative to the channel's own group (under ``RELATIVE`` × its largest importance; ISTA:
  also exactly zero), because BatchNorm before a conv is scale-invariant: an absolute cut is reached by
  shrinking a whole layer, which removes nothing without cost.
- A damage guard: up to ``EVALS`` times a run it evaluates 256 validation samples (accuracy, or minus the
  distillation error), skipping a reading while the strength is under ``RISE`` × the last sound one,
  or while the importances moved less than ``MOVED`` since the last reading (the model is still the one
  judged sound, so the strength counts as safe; ``_reading_due``; reading on the training batches
  instead was free but missed the damage that stops L1 at ``params: 0.9``: 0.972 fine-tuned against
  0.992; so did 128 samples, 0.970).
  A reading short of the start by more than ``WARY`` × ``DAMAGE`` (and by more than three times one
  reading's binomial noise) is no sign of safety: no raise until the next reading, which is always due,
  and the strength is not taken as safe (L1 at ``params: 0.9`` on the digits CNN read 0.949 against
  0.992, was raised ×1.4 and read 0.08 next: 0.977 fine-tuned; held, 0.992). A reading ``COLLAPSE`` ×
  ``DAMAGE`` below the start is damage at once, not noise.
  One reading worse than at the start by more than ``DAMAGE`` holds the strength
  (on a 119-sample split one reading is often noise, and SGD restarting on a trained model dips); two
  in a row halve it, cap it for the rest of the run at ``CEILING`` × the strength of the last sound
  reading (what lay between was untested), and block raises until a reading is sound again. A sound
  reading at the ceiling while the ramp still lags lifts it by ``LIFT``: a ceiling set by one early
  overshoot otherwise froze ISTA at 28% near zero for the rest of the run (digits CNN). For L1 on γ
  this guard is what stops the strength: its penalty shrinks whole layers, so the relative share moves
  late.
- The penalty acts only on the channels that are to go: every method with a ``spare_strongest`` (all five)
  spares each group's strongest ``1 − wanted`` share (growing regularization's selective penalty, Wang et
  al. 2021), at every prune target. ISTA's proximal step subtracts one τ from a whole layer and zeroed every
  channel of the digits CNN at once; sparing only each layer's strongest channel still cost 11 points right
  after removing half the channels (0.884), sparing the kept share none (0.995). Receding's push −ln(s)·s(1
  − s) grows a thousandfold as a γ falls from the largest to a tenth of it: unspared, its steered run went
  from nothing moved at κ = 7,000 to the whole digits CNN collapsed at 10,000. Under a params/FLOPs/latency
  target the share is the one a uniform cut needs (``strength.wanted_fraction``). Until session 13, L1 and
  group lasso spared only each group's strongest channel there (a uniform share had measured worse with the
  controller of session 8: 0.90 fine-tuned against 0.987); with today's guard the uniform share is far
  better: at ``params: 0.9``, the digits CNN 0.992 right after pruning (0.919 sparing one), the cancer MLP
  0.966 (0.945), ResNet-18 0.997 (0.854). ``selective`` False (one channel per group) is only what a run
  resumed from an older checkpoint keeps. Polarization is spared too since session 14 (its cut then within
  each layer): unspared, on a held-out 1-D signal CNN its whole-network push did damage before any channel
  separated, the guard held it at 12% near zero of 50% wanted, and removing half the channels left 0.41
  (0.995 spared); ResNet-18 at 70% of channels / 90% of parameters fine-tuned 0.952 → 0.980 / 0.970. Session
  13 had found no clear gain on the digits CNN and the cancer MLP alone.
- The start is ``Method.steered_start()``: the paper's value, except receding on a trained upload, whose
  paper κ moves nothing there; it starts at the κ that moves the median channel as fast as L1's default λ.
- Works for every method through ``Method.strength`` (read by each method's per-step hook).

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
STEP = 0.3  # the most a check raises the strength by (×1.3), when far behind
BACKOFF = 0.5
GROWTH = 4.0
CEILING = 0.8  # after damage the strength never again exceeds this share of the last one known to be safe
LIFT = 1.25  # a sound reading at the ceiling during the ramp lifts it by this much
CHECKS = 100
EVALS = 20
GUARD_SAMPLES = 256  # held-out samples per guard reading
RISE = 1.25  # a guard reading is skipped unless the strength rose this much since the last sound one
MOVED = 0.05  # ... and unless the importances moved this share (L1) since the last reading
CAP = 1e4  # the strength never exceeds this multiple of its first value (the method's default)
RELATIVE = 0.1  # a channel is near zero under this fraction of its group's largest importance
DAMAGE = 0.05  # accuracy (5 points, classification) or relative squared output error (distillation)
WARY = 0.5  # a reading this share of DAMAGE below the start (and over its noise) blocks raises until the next
COLLAPSE = 4.0  # a reading COLLAPSE × DAMAGE below the start is damage at once, without a second reading


class StrengthController:
    """Steers ``method.strength`` during one run; ``tick()`` after every optimizer step.

    Growing regularization with feedback, everything measured *within each channel's group* (a BatchNorm
    followed by a conv is scale-invariant, so an absolute |γ| can fall for a whole layer while no channel
    becomes removable). The signal is the relative importance at the wanted rank, ``r_w`` (the wanted
    quantile of importance ÷ its group's largest), planned to fall from where it starts to ``RELATIVE``
    in proportion to the learning rate spent, by the end of the ramp. Every check: ``r_w`` above its plan
    (or the near-zero share under its goal) → strength × (1 + up to ``step_max``, by how far behind); below
    its plan and the share over its goal → ÷ (1 + ``step_max``/2). Two bad guard readings in a row → ×
    ``BACKOFF``, a ceiling, and no raise until the guard reads the model as sound again. After the ramp the
    strength only holds or falls: a raise there has nothing left to steer against and is what collapsed
    whole layers (ISTA) in early versions.

    The start is the method's own default (the paper's value; receding's on a trained upload, module
    docstring): low, since a strength too high at the start
    wrecks a network before any reading can say so. ``k`` (strength ÷ start) is the gain the plot draws.
    ``quality()`` returns the guard's reading, higher = better, or None. ``lr_at(step)`` is the trainer's
    schedule, ``lr_gain`` its momentum factor 1/(1 − m) (1 for ISTA's momentum-free γ step).
    """

    def __init__(self, method: Method, groups: Any, *, name: str, wanted: float, threshold: float,
                 total_steps: int, lr_at: Callable[[int], float], lr_gain: float = 1.0,
                 quality: Callable[[], float | None] | None = None, start_step: int = 0,
                 state: dict[str, Any] | None = None, selective: bool = True,
                 samples: int | None = None) -> None:
        import numpy as np

        self.method, self.groups = method, groups
        self._gid: Any = None  # (each channel's group, each group's first channel), built at the first check
        self.wanted = min(max(wanted, 0.0) + MARGIN, 0.99)
        st = state or {}
        self.threshold = float(st.get("threshold", threshold))  # a resumed run keeps its first cut
        self.total = max(1, total_steps)
        self.ramp_steps = max(1, round(RAMP_END * self.total))
        self.check_every = max(1, self.total // CHECKS)
        # a multiple of check_every: readings happen at checks only (an earlier version read every 10th check)
        self.eval_every = self.check_every * max(1, round(self.total / EVALS / self.check_every))
        # at most ×GROWTH between two guard readings, so a strength that does damage is caught near where it began
        self.step_max = min(STEP, GROWTH ** (self.check_every / self.eval_every) - 1) if quality is not None else STEP
        self.cum_lr = np.cumsum(np.fromiter((lr_at(s) * lr_gain for s in range(self.total)), float, self.total))
        self.quality = quality
        self.step = start_step
        self.q0: float | None = st.get("q0")
        self.damaged = bool(st.get("damaged", False))
        self.wary = bool(st.get("wary", False))  # the last reading fell short of the start, not yet by DAMAGE
        self.trajectory: list[dict[str, Any]] = list(st.get("trajectory", []))
        if self.q0 is None and quality is not None:
            self.q0 = quality()
        # one reading's noise (binomial, for an accuracy over ``samples``): a drop within it is not a warning
        q0 = self.q0 if self.q0 is not None and 0 <= self.q0 <= 1 else None
        self.noise = (q0 * (1 - q0) / samples) ** 0.5 if samples and q0 is not None else 0.0
        self.r0 = float(st["r0"]) if "r0" in st else self._stats(self._importance())[1]
        self.first = float(st.get("first", method.strength if method.strength > 0 else 1e-4))
        self.strength = float(st.get("strength", self.first))
        self.ceiling = float(st.get("ceiling", CAP * self.first))
        self.safe = float(st.get("safe", self.first))  # the strength at the last sound guard reading
        self.episode = bool(st.get("episode", False))  # inside a run of bad readings
        self.selective = bool(st.get("selective", selective))
        # the importances at the last guard reading (None after a resume: the next reading is due)
        self._read_at: Any = self._importance().detach().clone() if self.q0 is not None and state is None else None
        self.method.strength = self.strength
        self._spare()

    def _spare(self, imp: Any = None) -> None:
        """``imp``: the importances this check already read (no step since), so the method need not again."""
        spare = getattr(self.method, "spare_strongest", None)  # every method today (module docstring)
        if spare is not None:
            spare(1.0 - self.wanted if self.selective else 0.0, imp)  # 0: each group's strongest channel only

    @property
    def k(self) -> float:
        return self.strength / max(self.first, 1e-30)

    def goal(self, progress: float) -> float:
        return self.wanted * min(1.0, progress / RAMP_END)

    def _importance(self) -> Any:
        return self.method.channel_importance(self.groups)

    def _stats(self, imp: Any) -> tuple[float, float]:
        """(share of channels near zero *within their group*, relative importance of the channel at the wanted
        rank), from one host copy of the importances, in numpy: a check runs about a hundred times a run,
        right after a training step, when each small torch op costs 80–200 µs (cold caches; 20 µs in a tight
        loop), and these were a dozen of them.

        Near zero: under ``RELATIVE`` × the group's largest importance (or exactly zero); only channels small
        next to their layer's strongest go without cost. The wanted rank's channel is the one the cut must
        reach. Each importance is divided by its group's largest (0 where the whole group is 0); the groups
        are contiguous in ``channel_importance``'s order, so their largest is one ``reduceat``."""
        import numpy as np

        a = imp.detach().float().cpu().numpy()
        if not a.size:
            return 0.0, 0.0
        rel = a
        if self.groups.groups:
            if self._gid is None:
                sizes = np.array([g.size for g in self.groups.groups])
                self._gid = (np.repeat(np.arange(len(sizes)), sizes), np.cumsum(sizes) - sizes)
            gid, starts = self._gid
            top = np.maximum.reduceat(a, starts)[gid]  # importances are ≥ 0
            rel = np.where(top > 0, a / np.maximum(top, 1e-30), 0.0)
        small = (rel < RELATIVE) | (a == 0)
        if self.method.exact_zeros:
            small &= a < self.threshold
        pos = min(self.wanted, 1.0) * (rel.size - 1)  # the quantile, linearly interpolated (np.quantile's
        lo = int(pos)  # default, without its overhead)
        hi = min(lo + 1, rel.size - 1)
        part = np.partition(rel, (lo, hi))
        return float(small.mean()), float(part[lo] + (part[hi] - part[lo]) * (pos - lo))

    def _lr_done(self, step: int) -> float:
        ramp = float(self.cum_lr[min(self.ramp_steps, self.total) - 1])
        return float(self.cum_lr[min(step, self.ramp_steps) - 1]) / max(ramp, 1e-12) if step > 0 else 0.0

    def _plan(self, step: int) -> float:
        """Where the wanted-rank relative importance should be at ``step``: from its start down to
        ``RELATIVE`` in proportion to the learning rate spent (the penalty moves γ per unit of lr)."""
        return self.r0 + (min(RELATIVE, self.r0) - self.r0) * min(1.0, self._lr_done(step))

    def _moved(self, imp: Any) -> float:
        """How far the importances moved since the last guard reading: Σ|Δ| ÷ Σ|then| (inf when unknown)."""
        if self._read_at is None or self._read_at.shape != imp.shape:
            return float("inf")
        return float((imp - self._read_at).abs().sum() / self._read_at.abs().sum().clamp_min(1e-30))

    def _reading_due(self, imp: Any) -> bool | None:
        """A guard reading at every ``eval_every``-th step (none forced at the last: nothing is steered after it,
        and the report's ``sparse`` stage evaluates the whole validation split there), skipped while the
        strength is less than ``RISE`` × the one of the last sound reading and none was bad: it would judge a
        strength much like one already judged sound (each reading evaluates ``GUARD_SAMPLES``; on the digits
        CNN the readings were 10% of sparse training). Also skipped while the importances moved less than
        ``MOVED`` since the last reading: the penalty has not yet changed the model the guard judged sound
        (early in the ramp, the strength grows ×4 between readings for a few of them while γ hardly moves:
        those readings were 5 of 13, and the guard was 9% of the digits CNN's sparse training); None says so.
        Never skipped at the ceiling during the ramp: only a sound reading there lifts it (``LIFT`` =
        ``RISE``, so a lifted ceiling alone would not make one due)."""
        at_ceiling = self.step < self.ramp_steps and self.strength >= 0.99 * self.ceiling
        if self.step % self.eval_every:
            return False
        if self.damaged or self.wary or at_ceiling:
            return True
        if self.strength <= self.safe * RISE:
            return False
        return True if self._moved(imp) > MOVED else None

    def tick(self) -> None:
        self.step += 1
        if self.step % self.check_every and self.step != self.total:
            return
        t = self.step / self.total
        imp = self._importance()
        share, rw = self._stats(imp)
        due = self._reading_due(imp) if self.quality is not None else False
        q = self.quality() if due else None
        goal = self.goal(t)
        plan = self._plan(self.step)
        row: dict[str, Any] = {"progress": round(t, 4), "strength": float(f"{self.strength:.4g}"),
                               "near_zero": round(share, 4), "goal": round(goal, 4),
                               "wanted_rank_relative": round(rw, 4), "plan": round(plan, 4)}
        if q is not None:
            row["quality"] = round(q, 4)
            self._read_at = imp.detach().clone()
        elif due is None:  # not read: the model is still the one judged sound, so this strength is safe too
            row["guard"] = "unmoved"
            self.safe = self.strength
        confirmed = False
        if q is not None and self.q0 is not None:
            drop = self.q0 - q
            bad = drop > DAMAGE
            # one bad reading is often noise (a small validation split, SGD restarting on a trained model):
            # it blocks raises; a second one in a row is damage, and so is one collapse
            confirmed, self.damaged = bad and (self.damaged or drop > COLLAPSE * DAMAGE), bad
            # a reading short of the start by half the bound is no sign of safety: no raise until the next one
            self.wary = not bad and drop > max(WARY * DAMAGE, 3 * self.noise)
            if bad and not confirmed:
                row["action"] = "suspect: hold"
            if self.wary:
                row["action"] = "wary: hold"
            if not bad and not self.wary:
                self.safe, self.episode = self.strength, False
                if self.step < self.ramp_steps and self.strength >= 0.99 * self.ceiling:
                    self.ceiling *= LIFT  # sound at the ceiling, still in the ramp: probe above it again
        ramp = self.step < self.ramp_steps
        if confirmed:
            if not self.episode:  # later bad readings of the same episode are the network still recovering
                # the strengths between the last sound reading and this one are untested ground: the ceiling
                # is below the last one known to be safe
                self.ceiling = min(self.ceiling, CEILING * self.safe)
                self.episode = True
            self.strength *= BACKOFF
            row["action"] = "damage: backed off"
        elif ramp:
            lag = max(rw - plan, goal - share) if share < goal - TOL or rw > plan + TOL else 0.0
            if lag > 0 and not (self.damaged or self.wary):  # no raise until the guard reads the model as sound
                self.strength *= 1 + self.step_max * min(1.0, lag / 0.1)
                row["action"] = "raise"
            elif rw < plan - TOL and share > goal + 2 * TOL:
                self.strength /= 1 + self.step_max / 2
                row["action"] = "lower"
        elif share > self.wanted + 2 * TOL:  # consolidation: hold, or ease off an overshoot
            self.strength /= 1 + self.step_max / 2
            row["action"] = "lower"
        self.strength = min(self.strength, self.ceiling)
        if self.ceiling < CAP * self.first:
            row["ceiling"] = float(f"{self.ceiling:.4g}")
        row["gain"] = float(f"{self.k:.4g}")
        self.method.strength = self.strength
        self._spare(imp)
        self.trajectory.append(row)

    def state(self) -> dict[str, Any]:
        """What a resumed run needs to continue steering (kept in the checkpoint)."""
        return {"strength": self.strength, "ceiling": self.ceiling, "safe": self.safe, "episode": self.episode,
                "q0": self.q0, "damaged": self.damaged, "wary": self.wary,
                "first": self.first, "r0": self.r0, "threshold": self.threshold, "trajectory": self.trajectory,
                "selective": self.selective}

    def record(self) -> dict[str, Any]:
        final = self.trajectory[-1] if self.trajectory else {}
        return {"used": True, "wanted_fraction": round(self.wanted - MARGIN, 4), "aim": round(self.wanted, 4),
                "sparsity_threshold": self.threshold, "start_strength": float(f"{self.first:.4g}"),
                "final_strength": float(f"{self.strength:.4g}"), "near_zero_reached": final.get("near_zero"),
                "checks": len(self.trajectory), "check_every_steps": self.check_every,
                "ramp_end": RAMP_END, "damage_bound": DAMAGE,
                "wary_bound": round(max(WARY * DAMAGE, 3 * self.noise), 4),
                "collapse_bound": COLLAPSE * DAMAGE, "baseline_quality": self.q0,
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
        why = {"given": "the spec gives method.strength",
               "pilot": "the strength pilot runs instead (method.search 'pilot')",
               "none": "method.search is 'none' (or pilot_runs 0): the paper's default strength"}[how]
        return None, {"used": False, "why": why}
    if train.epochs == 0:
        return None, {"used": False, "why": "no sparse training (sparse_training.epochs is 0)"}
    # where each group spares a share (module docstring), the channels near zero lie where a uniform cut falls
    frac = wanted_fraction(model, gs, spec, example, uniform=hasattr(method, "spare_strongest"))
    if frac is None or frac <= 0:
        return None, {"used": False, "why": f"prune.target '{spec.prune.target}' sets its own cut, not a "
                                            f"fraction: the paper's default strength"}
    per_epoch = len(make_loader(data.x_train, None, train.batch_size, shuffle=True, seed=spec.seed))
    total = train.epochs * per_epoch
    method.strength = method.steered_start()
    imp = method.channel_importance(gs)
    threshold = method.near_zero if method.exact_zeros else 0.1 * float(imp.median())
    gain = 1.0 if spec.method.name == "ista" or train.optimizer != "sgd" else 1 / max(1e-3, 1 - train.momentum)
    val_x = io.rows(data.x_val, slice(0, GUARD_SAMPLES))
    val_y = data.y_val[:GUARD_SAMPLES] if data.y_val is not None else None

    def quality() -> float | None:
        if spec.task == "classification" and val_y is not None:
            return evaluate(model, val_x, val_y, task="classification", device=device).accuracy
        ev = evaluate(model, val_x, None, task="distillation", teacher=teacher, device=device)
        return None if ev.distill_error is None else -ev.distill_error

    return StrengthController(method, gs, name=spec.method.name, wanted=frac, threshold=threshold,
                              total_steps=total, lr_at=lambda it: lr_at(train, it, total), lr_gain=gain,
                              quality=quality, start_step=start_epoch * per_epoch, state=state,
                              selective=True,
                              samples=len(val_y) if spec.task == "classification" and val_y is not None else None), {}
