"""A name -> function registry (verl `core_algos` style), shared by advantage estimators and loss aggregations."""

from collections.abc import Callable


class Registry(dict[str, Callable]):
    """`@registry.register(name)` adds a function; `registry.lookup(name)` finds it or names the known ones."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable[[Callable], Callable]:
        def add(fn: Callable) -> Callable:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self[name] = fn
            return fn

        return add

    def lookup(self, name: str) -> Callable:
        if name not in self:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {sorted(self)}")
        return self[name]
