"""Checking that a lifted or transformed graph still computes what the uploaded model did.

Every lift and every graph rewrite is checked against the original on an example, because a silently
different model is worse than a failed job. When the outputs disagree, a single relative error says
nothing about where the rewrite went wrong, so given a pre-rewrite reference graph we replay both node
by node and name the first node whose value departs, which is usually the culprit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from .. import io
from ..errors import ParityError


def relative_error(want: torch.Tensor, got: torch.Tensor) -> float:
    """``max|a-b| / max(max|a|, 1e-12)`` in float64; NaN where the other has none counts as infinite."""
    a, b = want.detach().double(), got.detach().double()
    if a.shape != b.shape:
        return float("inf")
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    if not torch.equal(nan_a, nan_b):
        return float("inf")
    a, b = a[~nan_a], b[~nan_b]
    if a.numel() == 0:
        return 0.0
    diff = float((a - b).abs().max())
    scale = max(float(a.abs().max()), 1e-12)
    if diff != diff:  # inf - inf
        return float("inf")
    return diff / scale


def _key(n: fx.Node) -> str:
    # modularize copies meta onto the call_module it substitutes, so this survives the rewrite
    return str(n.meta.get("lift_name", n.name))


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[str, torch.Tensor] = {}
        self.order: list[fx.Node] = []

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor) and n.op != "placeholder":
            self.values[_key(n)] = out.detach().clone()  # clone: later in-place ops would rewrite it
            self.order.append(n)
        return out


def first_divergence(reference: fx.GraphModule, lifted: fx.GraphModule, example: io.Inputs,
                     rtol: float) -> str | None:
    """Name the first node of ``lifted`` whose output differs from the same-named node of ``reference``."""
    ref, got = _Recorder(reference), _Recorder(lifted)
    with torch.no_grad():
        try:
            ref.run(*io.args(example))
        except Exception:  # the reference itself failing means we cannot localise, not a new error
            return None
        try:
            got.run(*io.args(example))
        except Exception as e:
            bad = got.order[-1].name if got.order else "the first node"
            return f"execution failed after {bad}: {type(e).__name__}"
    for n in got.order:
        want = ref.values.get(_key(n))
        if want is None or want.shape != got.values[_key(n)].shape:
            continue
        if relative_error(want, got.values[_key(n)]) > rtol:
            target = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", n.target)
            src = f", source {n.meta['ts_node']}" if "ts_node" in n.meta else ""
            return f"{n.name} ({n.op} {target}{src})"
    return None


def check_parity(original: Callable[..., Any], lifted: fx.GraphModule,
                 example: io.Inputs, *, rtol: float = 1e-5, stage: str = "import",
                 reference: fx.GraphModule | Callable[[], fx.GraphModule] | None = None) -> float:
    """Relative error of ``lifted`` against ``original`` on ``example``; ParityError above ``rtol``.

    ``reference`` is an fx graph known to agree with ``original`` node for node (the graph before a
    rewrite), or a function building one on demand; with it the error names the first node whose value
    departs. Several inputs are a tuple (``slimcore.io``); every output is compared, and the structure
    (tuple/list/dict, names, order) must be the original's.
    """
    was_training = lifted.training
    lifted.eval()
    try:
        with torch.no_grad():
            want = io.call(original, example)
            got = io.call(lifted, example)
    finally:
        lifted.train(was_training)
    if io.structure(want) != io.structure(got) or not io.leaves(want):
        raise ParityError(f"{stage}: outputs {io.describe(got)} differ in form from the original's "
                          f"{io.describe(want)}")
    for name, w, g in zip(io.names(want), io.leaves(want), io.leaves(got), strict=True):
        if w.shape != g.shape:
            raise ParityError(f"{stage}: output {name} has shape {list(g.shape)}, the original's "
                              f"{list(w.shape)}")
    err = max(relative_error(w, g) for w, g in zip(io.leaves(want), io.leaves(got), strict=True))
    if err <= rtol:
        return err
    where = None
    if reference is not None:
        if not isinstance(reference, fx.GraphModule):
            reference = reference()
        was_ref = reference.training
        reference.eval()
        lifted.eval()
        try:
            where = first_divergence(reference, lifted, example, rtol)
        finally:
            reference.train(was_ref)
            lifted.train(was_training)
    detail = f"; first differing node: {where}" if where else ""
    msg = f"{stage}: output differs from the original (relative error {err:.3g} > {rtol:g}){detail}"
    raise ParityError(" ".join(msg.split()))
