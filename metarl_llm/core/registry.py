"""One registry helper for everything selected by name in a config: advantage estimators
(``algo.advantage``), policy losses (``algo.policy_loss``), progress estimators
(``bonus.estimator``), verifiers (``bonus.verifier``) and rollout engines (``rollout.engine``).

    ADVANTAGES = Registry("advantage estimator", "algo.advantage")

    @ADVANTAGES.register("gae")
    def gae(...): ...

    ADVANTAGES.lookup(cfg.algo.advantage)   # a clear error naming the option and the choices

A registry is a ``dict`` (name -> object), so ``sorted(REG)``, ``REG[name]`` and ``name in REG``
work as on a dict. Registering a name twice is an error: a second definition silently replacing
the first is how a typo in a plug-in would change an experiment without a word.
"""

from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T")


class Registry(dict):
    """Name -> registered object, for the config option ``option`` (used in error messages)."""

    def __init__(self, kind: str, option: str):
        super().__init__()
        self.kind = kind  # what is registered, e.g. "advantage estimator"
        self.option = option  # the config key that selects one, e.g. "algo.advantage"

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the function or class under ``name``; a taken name is a ValueError."""

        def wrap(obj: T) -> T:
            if name in self:
                raise ValueError(
                    f"{self.kind} {name!r} is already registered (by {self[name]!r}); "
                    f"pick another name for {obj!r} or unregister the first with .pop({name!r})"
                )
            self[name] = obj
            return obj

        return wrap

    def lookup(self, name: str):
        """The object registered as ``name``; else a ValueError naming ``option`` and the choices."""
        if name not in self:
            raise ValueError(f"{self.option}={name!r} is not registered; choose from {sorted(self)}")
        return self[name]
