"""Our own channel-dependency analysis over the lifted fx graph (see :mod:`.core` for the model).

The package entry imports the rules so they are registered before anything analyses a graph.
"""

from __future__ import annotations

from . import rules, rules_modules, rules_views  # noqa: F401  (importing registers the propagation rules)
from .analyze import Coupling, analyze
from .surgery import prune

__all__ = ["Coupling", "analyze", "prune"]
