"""A name -> class registry shared by the inner solvers and the linear solvers."""

from __future__ import annotations

import inspect
from typing import Any, Callable


def option_names(cls: type) -> list[str]:
    """The keyword options a class's constructor accepts."""
    sig = inspect.signature(cls.__init__)
    return [
        p.name
        for p in sig.parameters.values()
        if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]


def check_options(cls: type, options: dict[str, Any], label: str) -> None:
    """Raise ``TypeError`` naming the valid options when ``options`` has an unknown key."""
    valid = option_names(cls)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(
            f"unknown option(s) {', '.join(repr(u) for u in unknown)} for {label}; "
            f"valid options: {', '.join(valid) or '(none)'}."
        )


class Registry:
    """Maps lower-case names to classes; builds instances with checked options."""

    def __init__(self, kind: str, base: type):
        self.kind = kind  # "inner solver" / "linear solver"
        self.base = base
        self._classes: dict[str, type] = {}

    def register(self, name: str) -> Callable[[type], type]:
        key = self._key(name)

        def decorator(cls: type) -> type:
            if not (isinstance(cls, type) and issubclass(cls, self.base)):
                raise TypeError(f"register expects a subclass of {self.base.__name__}, got {cls!r}.")
            if key in self._classes and self._classes[key] is not cls:
                raise ValueError(
                    f"a {self.kind} named {name!r} is registered already ({self._classes[key].__name__}); "
                    f"pick another name."
                )
            self._classes[key] = cls
            cls.name = key
            return cls

        return decorator

    @staticmethod
    def _key(name: str) -> str:
        if not isinstance(name, str) or not name.strip():
            raise TypeError(f"a registry name must be a non-empty string, got {name!r}.")
        return name.strip().lower().replace("-", "_")

    def available(self) -> list[str]:
        return sorted(self._classes)

    def lookup(self, name: str) -> type:
        key = self._key(name)
        if key not in self._classes:
            raise ValueError(
                f"unknown {self.kind} {name!r}; available: {', '.join(self.available())}."
            )
        return self._classes[key]

    def build(self, name: str, options: dict[str, Any]) -> Any:
        cls = self.lookup(name)
        check_options(cls, options, f"{self.kind} {cls.name!r}")
        return cls(**options)
