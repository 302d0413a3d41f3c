"""The one registry every extension point uses: tasks, rewards, advantage estimators, policy losses, KL
estimators, loss aggregations, engines and stages.

    ADVANTAGES = Registry("advantage estimator", "stage.rl.advantage", modules=("rlhf.advantages",))

    @ADVANTAGES.register("grpo")
    def grpo(rewards): ...

    ADVANTAGES.get(cfg.stage.rl.advantage)  # ConfigError naming stage.rl.advantage and the valid names

`modules` are imported on the first lookup, so a registry is complete whoever asks first (the config
validation, a reward worker) without its users importing the implementations. `resolve`, when given, maps
a name no entry has to an entry (a family of names, e.g. reasoning-gym's datasets) or None.

Light on purpose (no torch): reward worker processes import it.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from typing import Any, Callable, Generic, Iterable, TypeVar

from core.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(
        self,
        kind: str,
        key: str,
        modules: Iterable[str] = (),
        resolve: Callable[[str], T | None] | None = None,
        extra_names: Iterable[str] = (),
        hint: str = "",
    ):
        self.kind, self.key, self.hint = kind, key, hint
        self._modules, self._resolve = tuple(modules), resolve
        self._extra = tuple(extra_names)  # accepted names that are no entry (e.g. "none" for stage.rl.kl)
        self._items: dict[str, T] = {}
        self._origins: dict[str, tuple[str, str]] = {}
        self._loaded = False

    def register(self, name: str, obj: T | None = None):
        """`@registry.register("name")` on a function or class, or `registry.register("name", obj)`."""
        caller = sys._getframe(1).f_globals.get("__name__", "?")

        def add(item: T) -> T:
            old = self._origins.get(name)
            origin = _origin(item, caller)
            # The same definition seen again is its module imported under a second name (a test module as
            # `tests.x` and `x`, a script as `__main__` and `__mp_main__`): keep the latest.
            if old is not None and old != origin:
                raise ValueError(
                    f"{self.kind} {name!r} is already registered by {old[0]}.{old[1]}; pick another name for "
                    f"{origin[0]}.{origin[1]}"
                )
            self._items[name], self._origins[name] = item, origin
            return item

        return add if obj is None else add(obj)

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True  # before importing: the modules register into this registry
            for module in self._modules:
                importlib.import_module(module)

    def names(self) -> list[str]:
        self._load()
        return sorted([*self._items, *self._extra])

    def find(self, name: str) -> T | None:
        """The entry for `name`, or None."""
        self._load()
        if name in self._items:
            return self._items[name]
        return self._resolve(name) if self._resolve is not None and isinstance(name, str) else None

    def __contains__(self, name: str) -> bool:
        return name in self._extra or self.find(name) is not None

    def get(self, name: str, key: str | None = None) -> T:
        """The entry for `name`; ConfigError naming the config key (`key`, else the registry's) and the
        valid names otherwise."""
        item = self.find(name)
        if item is None:
            raise ConfigError(self.unknown(name, key))
        return item

    def check(self, name: str, key: str | None = None) -> None:
        if name not in self:
            raise ConfigError(self.unknown(name, key))

    def unknown(self, name: Any, key: str | None = None) -> str:
        names = self.names()
        close = difflib.get_close_matches(str(name), names, n=3) if isinstance(name, str) else []
        near = f" (close: {close})" if close else ""
        hint = f" {self.hint}" if self.hint else ""
        return f"{key or self.key}={name!r}: no such {self.kind}{near}. Fix: use one of {names}.{hint}"

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __iter__(self):
        return iter(self.names())

    def items(self) -> list[tuple[str, T]]:
        self._load()
        return sorted(self._items.items())


def _origin(obj: Any, caller: str) -> tuple[str, str]:
    """Where an entry was defined: (module, qualified name) of a function or class, else (the registering
    module, the object's type). The module is its last component, `__main__` and `__mp_main__` alike."""
    if hasattr(obj, "__qualname__") and hasattr(obj, "__module__"):
        module, name = obj.__module__, obj.__qualname__
    else:
        module, name = caller, type(obj).__qualname__
    module = "__main__" if module == "__mp_main__" else module.rsplit(".", 1)[-1]
    return module, name
