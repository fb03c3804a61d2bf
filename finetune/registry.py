"""Named plug-ins (objectives, export formats): registered by decorator, features imported on demand.

A feature package that sits above the registry's layer (the drafter, GRPO) is listed here by
module path only and imported the first time its name is asked for, as transformers' auto
classes do; importing it runs its `@register`. So the low layers never import the features
built on them, and `lint-imports` keeps them apart, while every name is always available.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


class Registry:
    def __init__(self, kind: str, features: dict[str, str] | None = None):
        self.kind = kind
        self._entries: dict[str, object] = {}
        # name → module that registers it when imported (features outside this package)
        self._features = dict(features or {})

    def register(self, name: str) -> Callable:
        """Decorator: make the class or function available as `name`."""
        def add(obj):
            self._entries[name] = obj
            if isinstance(obj, type):
                obj.name = name
            return obj
        return add

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def get(self, name: str):
        """The entry called `name` (importing its feature package if needed), or None."""
        if name not in self._entries and name in self._features:
            importlib.import_module(self._features[name])
        return self._entries.get(name)

    def names(self) -> list[str]:
        return sorted(set(self._entries) | set(self._features))
