"""The strength pilot in the pipeline: short sparse-training runs that pick λ/ρ/κ when the spec gives none.

Why: the papers' default strengths were tuned for 160-epoch CIFAR schedules; on a job's short schedule
they zero nothing, and a strength ten times too high wipes out the network (bench/README.md, method
comparison). The pilot asks the data instead.

How (a documented approximation, checked after the real run):
- The wanted fraction is the share of prunable channels the prune target will remove: ``prune.amount``
  for a ``channels`` target, for ``flops``/``params`` the share a plan on the starting model removes.
- Each pilot run is the real sparse training's first ``ceil(epochs / runs)`` epochs, learning-rate
  schedule and seed included (so all runs together cost about one sparse-training phase), and measures
  the share of channels whose importance is near zero: under a tenth of the starting median importance,
  or exactly zero for ISTA, whose point is exact zeros. ``pilot_strength`` bisects log10(strength). A run
  that costs more than ``DAMAGE`` validation accuracy (classification) counts as too strong, whatever
  its sparsity.
- The real run continues from the chosen pilot's state (model, optimizer, epoch): the pilot already
  is the real run's beginning, so nothing is trained twice. If that state has the wanted fraction (less
  the pilot's tolerance) near zero, sparse training ends there (the later epochs would only push more
  channels than the plan removes toward zero); else it trains on, and stops once the fraction is reached.
  If no strength reached it without damage, the strongest safe one trains on. Should sparse training end
  more than ``DAMAGE`` below the baseline's accuracy, the run returns to the pilot's state. (Running pilots on a
  compressed schedule and scaling the strength by the ratio of steps was tried first and failed: the
  penalty's fight with the loss is not linear in steps — on the digits CNN a λ that zeroed nothing in a
  2-epoch schedule collapsed the network in an 8-epoch one. Stopping a fresh run at the first epoch
  with enough sparsity failed too: the trajectory passes through damaged states the pilot's end did not
  have.) The report warns when the run ends short of the wanted fraction.

Runs with ``method.search: "pilot"`` only: the default ``"auto"`` is the in-run controller
(slimcore/control.py) for every method, which matched or beat the pilot at its own cost in epochs
(bench/README.md; receding, the last to switch, in session 13). Skipped (the
method's paper default is used, and the report says why) for a ``threshold`` target, whose cut is not a
fraction.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch

from . import io
from .errors import JobCanceled
from .groups import all_bns, build_groups
from .methods import METHODS, MethodContext, pilot_strength
from .prune import plan
from .spec import JobSpec
from .train import evaluate, fit

# A pilot whose sparse training costs more validation accuracy than this has a strength that wrecks the
# network (the failure bench/README.md shows for L1 at 0.5): the search goes lower.
DAMAGE = 0.1
TOL = 0.05  # the pilot's "close enough" to the wanted fraction; the real run stops at wanted − TOL


def wanted_fraction(model: torch.nn.Module, gs: Any, spec: JobSpec, example: io.Inputs,
                    uniform: bool = False) -> float | None:
    """Share of prunable channels the prune target removes; None when the target is not a fraction.

    A latency target is known only once candidates are timed (after sparse training), so the share is
    estimated as a FLOPs target of the same amount; a FLOPs share is also what latency falls with first.
    Rounding is left out (``round_to: "auto"`` needs the runtime): it moves the share by a few channels.

    ``uniform``: the share when every group loses the same share of its channels, which is where a steered
    penalty that spares each group's strongest share leaves the channels near zero (ISTA,
    slimcore/control.py). The share of a ranked plan is less (it cuts deeper into the layers that cost
    most), and at ``params: 0.9`` on the digits CNN steering ISTA to it left 61% of channels at zero in
    every layer where the plan needed 69%: the cut then went through channels at 95% of their layer's
    largest and fine-tuning came back to 0.927 (against 0.997 at 70% of channels, 91% of parameters)."""
    target = spec.prune.target
    if target == "channels":
        return float(spec.prune.amount)
    if target in ("flops", "params", "latency"):
        unit = "flops" if target == "latency" else target
        if uniform:
            return _uniform_share(model, gs, unit, float(spec.prune.amount), spec.prune.min_channels, example)
        total = sum(g.size for g in gs.groups)
        proxy = spec.prune.model_copy(update={"target": unit,
                                              "round_to": 1 if spec.prune.round_to == "auto" else spec.prune.round_to})
        p = plan(model, gs, proxy, "max", example)
        return p.removed_channels / max(total, 1)
    return None


def _uniform_share(model: torch.nn.Module, gs: Any, unit: str, amount: float, min_channels: int,
                   example: io.Inputs) -> float:
    """The least share s (in steps of 1/64) such that removing ``floor(s × size)`` of every group's weakest
    channels (each group keeping ``min_channels``) removes ``amount`` of ``unit``; the channels' share then."""
    from .prune import _cost_after, _floor, cost

    base = cost(model, unit, example)

    def removal(share: float) -> dict[int, torch.Tensor]:
        out = {}
        for g in gs.groups:
            n = min(int(share * g.size), g.size - _floor(g.size, min_channels))
            if n > 0:
                out[g.gid] = torch.argsort(g.importance("max").float().cpu(), stable=True)[:n]
        return out

    lo, hi = 0, 64
    while lo < hi:  # smallest step whose removal reaches the amount (the largest when none does)
        mid = (lo + hi) // 2
        if 1 - _cost_after(model, gs, removal(mid / 64), unit, example) / base >= amount:
            hi = mid
        else:
            lo = mid + 1
    removed = sum(int(v.numel()) for v in removal(lo / 64).values())
    return removed / max(sum(g.size for g in gs.groups), 1)


# How far (in the units the penalty's gradient moves) importance must travel to reach near zero:
# |γ| itself for penalties on γ; for receding, w in logit space falls ~5 (s from 0.5 to 0.01) while
# d/dw κ·s(1 − ln s) = κ·(−ln s)·s(1 − s) averages ~0.1·κ on the way, hence 50.
_DISTANCE = {"receding": 50.0}
_DECADES_BELOW, _DECADES_ABOVE = 4.0, 2.0


def schedule_range(method: str, median_gamma: float, lr: float, momentum: float, steps: int) -> tuple[float, float]:
    """The strength bracket for this schedule: around the strength whose push alone moves γ to zero.

    A constant gradient g·strength moves a parameter by about steps · lr/(1 − momentum) · strength
    (heavy-ball SGD multiplies a steady gradient by 1/(1 − momentum); ISTA's γ step has no momentum).
    So ``base = distance / (steps · lr_eff)``; the bracket spans base·1e-4 … base·1e2 because the loss
    fights the penalty, ISTA scales ρ by per-layer λ_l, and cosine schedules halve the mean lr.
    The papers' fixed ranges (``PILOT_RANGES``) assume ~160-epoch schedules and miss short jobs by decades.
    """
    base = base_strength(method, median_gamma, lr, momentum, steps)
    return base * 10 ** -_DECADES_BELOW, min(base * 10 ** _DECADES_ABOVE, 10.0)


def base_strength(method: str, median_gamma: float, lr: float, momentum: float, steps: int) -> float:
    """The strength whose push alone moves the median importance to zero in ``steps`` (see above)."""
    lr_eff = lr if method == "ista" else lr / max(1e-3, 1.0 - momentum)
    return _DISTANCE.get(method, max(median_gamma, 1e-3)) / max(steps * lr_eff, 1e-12)


def choose_strength(model: torch.nn.Module, spec: JobSpec, data: Any, example: io.Inputs, gs: Any,
                    unprunable: dict[str, str] | None, *, device: torch.device, teacher: torch.nn.Module | None,
                    should_stop: Callable[[], bool] | None,
                    say: Callable[[str, float, dict[str, Any]], None]
                    ) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Run the pilot (or say why not): (warm start, record).

    The record goes into the report under ``pilot``: ``strength`` is the strength for the real run, or
    None to keep the method's default; ``sparsity_threshold`` is the importance under which a channel
    counts as near zero. The warm start is the chosen pilot's state (prepared model, optimizer, epoch,
    sparsity) for the real run to continue from, or None.
    """
    runs = spec.method.pilot_runs
    epochs = spec.sparse_training.epochs
    how = spec.method.strength_search()
    if how != "pilot":
        why = {"given": "the spec gives method.strength",
               "control": "the strength is steered within the one run (method.search 'control', or 'auto', "
                          "the default)",
               "none": "method.pilot_runs is 0: the paper's default strength" if spec.method.pilot_runs == 0
               else "method.search is 'none': the paper's default strength"}[how]
        return None, {"used": False, "why": why, "strength": None}
    if epochs == 0:
        return None, {"used": False, "why": "no sparse training (sparse_training.epochs is 0)", "strength": None}
    frac = wanted_fraction(model, gs, spec, example)
    if frac is None or frac <= 0:
        return None, {"used": False, "why": f"prune.target '{spec.prune.target}' sets its own cut, not a "
                                            f"fraction: the paper's default strength", "strength": None}
    pilot_epochs = max(1, math.ceil(epochs / runs))
    train = spec.sparse_training
    gammas = torch.cat([bn.weight.detach().abs().float().flatten() for _, bn in all_bns(model)
                        if bn.weight is not None])
    steps = pilot_epochs * max(1, math.ceil(io.num_rows(data.x_train) / train.batch_size))
    bounds = schedule_range(spec.method.name, float(gammas.median()), train.lr, train.momentum, steps)
    val_x, val_y = io.rows(data.x_val, slice(0, 1024)), data.y_val[:1024] if data.y_val is not None else None
    guard = spec.task == "classification" and val_y is not None
    base_acc = evaluate(model, val_x, val_y, task=spec.task, device=device).accuracy if guard else None
    tries: list[dict[str, Any]] = []
    cut: dict[str, float] = {}
    states: dict[float, dict[str, Any]] = {}

    def run(strength: float) -> float | None:
        m = copy.deepcopy(model)
        g = build_groups(m, example, spec.prune.ignore, unprunable)  # the traced graph cannot be deep-copied
        meth = METHODS.get(spec.method.name)(spec.method.model_copy(update={"strength": strength}),
                                             MethodContext(m, g, [b for _, b in all_bns(m)], example))
        meth.prepare(m)
        if "threshold" not in cut:
            cut["threshold"] = meth.near_zero if meth.exact_zeros else 0.1 * float(meth.channel_importance(g).median())
        say("sparse_training", 0.0, {"pilot_run": len(tries) + 1, "pilot_strength": strength})
        opt_state: dict[str, Any] = {}
        if not fit(m, data.x_train, data.y_train, train, task=spec.task, teacher=teacher, method=meth,
                   device=device, seed=spec.seed, should_stop=should_stop,
                   on_epoch_end=lambda epoch, st: opt_state.update(st),
                   stop_early=lambda epoch: epoch >= pilot_epochs):
            raise JobCanceled("sparse_training")
        sparsity = meth.sparsity(g, cut["threshold"])
        state = {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}  # the prepared form
        meth.finalize(m)
        acc = evaluate(m, val_x, val_y, task=spec.task, device=device).accuracy if guard else None
        damaged = acc is not None and base_acc is not None and acc < base_acc - DAMAGE
        tries.append({"strength": float(f"{strength:.4g}"), "sparsity": round(sparsity, 4),
                      "accuracy": None if acc is None else round(acc, 4), "damaged": damaged})
        if not damaged:
            states[strength] = {"model": state, "optimizer": copy.deepcopy(opt_state), "epoch": pilot_epochs,
                                "sparsity": sparsity}
        return None if damaged else sparsity

    found = pilot_strength(spec.method.name, run, target_fraction=frac, candidates=runs, bounds=bounds, tol=TOL)
    warm = states.get(found)
    return warm, {"used": True, "wanted_fraction": round(frac, 4), "baseline_accuracy": base_acc,
                  "stop_at": round(max(frac - TOL, 0.0), 4), "sparsity_threshold": cut["threshold"],
                  "pilot_epochs": pilot_epochs, "range": [float(f"{b:.3g}") for b in bounds], "tries": tries,
                  "strength": found}


def back_to_pilot_if_wrecked(model: torch.nn.Module, data: Any, warm: dict[str, Any] | None,
                             pilot: dict[str, Any], dev: torch.device) -> str | None:
    """After a piloted run: if sparse training ended more than ``DAMAGE`` below the baseline's accuracy, go
    back to the chosen pilot's state (checked safe) and say why; the pilot only guarded its own end, and the
    epochs after it can wreck the network (bench/README.md). Checked at the end, not per epoch: mid-schedule
    dips recover as the learning rate anneals, and reverting on them threw good runs away."""
    if warm is None or pilot.get("baseline_accuracy") is None or data.y_val is None:
        return None
    acc = evaluate(model, io.rows(data.x_val, slice(0, 1024)), data.y_val[:1024], task="classification",
                   device=dev).accuracy
    if acc is None or acc >= pilot["baseline_accuracy"] - DAMAGE:
        return None
    model.load_state_dict(warm["model"])
    return (f"sparse training after the pilot dropped validation accuracy to {acc:.3f} (baseline "
            f"{pilot['baseline_accuracy']:.3f}): went back to the chosen pilot's state after epoch {warm['epoch']}")


def plateau_stop(method: Any, gs: Any, record: dict[str, Any], pilot: dict[str, Any]) -> Callable[[int], bool]:
    """Stop sparse training once γ sparsity has stopped changing, or (piloted strength) once the wanted
    fraction of channels is near zero: further epochs would only push more channels than the plan removes
    toward zero, which costs accuracy and nothing else. Recorded in the report."""
    from .methods.pilot import SparsityPlateau

    watch = SparsityPlateau(patience=3, tol=0.01)

    target, cut = pilot.get("stop_at"), pilot.get("sparsity_threshold")

    def check(epoch: int) -> bool:
        if target is not None and method.sparsity(gs, cut) >= target:
            record.update(epoch=epoch, why=f"{target:.0%} of channels near zero, the pilot's target")
            return True
        if watch.update(method.sparsity(gs)):
            record.update(epoch=epoch, why="γ sparsity stopped changing")
            return True
        return False

    return check
