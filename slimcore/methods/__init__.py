"""Sparsity methods: how γ is pushed toward zero during sparse training.

One signature for every method: a factory ``(MethodSpec, MethodContext) -> Method``. The trainer calls
``after_backward()`` once gradients are final and unscaled (so AMP loss scaling cannot shrink the
penalty, the Torch-Pruning pitfall in FINDINGS), then the optimizer step, then ``after_step(lr)`` for
proximal updates. ``reduce`` says how coupled |γ| combine into one importance per channel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..groups import GroupSet
from ..registry import Registry
from ..spec import MethodSpec


@dataclass
class MethodContext:
    model: nn.Module
    groups: GroupSet
    bns: list[nn.modules.batchnorm._BatchNorm]


class Method:
    """Base: no penalty. Subclasses override the hooks they need."""

    reduce = "max"
    strength: float = 0.0

    def after_backward(self) -> None:
        return None

    def after_step(self, lr: float) -> None:
        return None

    def describe(self) -> dict[str, object]:
        return {"strength": self.strength, "reduce": self.reduce}


MethodFactory = Callable[[MethodSpec, MethodContext], Method]
METHODS: Registry[MethodFactory] = Registry("method")

from . import l1  # noqa: E402,F401  (registers itself)
