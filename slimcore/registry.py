"""A small named registry: methods, importers and exporters each get one, with one signature each."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, what: str) -> None:
        self.what = what
        self._items: dict[str, T] = {}
        self._lazy: dict[str, str] = {}  # name → the module that registers it when imported

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.what} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return deco

    def lazy(self, name: str, module: str) -> None:
        """Say that importing ``module`` registers ``name``, and import it only when ``name`` is first asked
        for. Why: ``import onnx`` alone takes 1.5 s (its ml_dtypes extension), and a worker runs each job in
        a fresh process; a TorchScript or .pt2 job should not pay for the ONNX importer and exporter."""
        if name not in self._items:
            self._lazy[name] = module

    def get(self, name: str) -> T:
        from .errors import SlimError

        if name not in self._items and name in self._lazy:
            module = self._lazy.pop(name)
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as e:
                raise SlimError(f"{self.what} {name!r} needs {e.name}, which is not installed") from None
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none"
            raise SlimError(f"unknown {self.what} {name!r}; known: {known}") from None

    def names(self) -> list[str]:
        return sorted({*self._items, *self._lazy})

    def __contains__(self, name: object) -> bool:
        return name in self._items or name in self._lazy

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
