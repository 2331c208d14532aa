"""Named extension points: poolers, dataset formats, loss terms, embedder sources.

Each is a `Registry`; an extension registers itself by name with a decorator, and a config names
it. An unknown name is a ConfigError that names the config field and lists what is registered.
"""
from __future__ import annotations

from typing import Generic, Iterator, Optional, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """name -> extension (a function or a class) of one kind."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: Optional[T] = None):
        """`@registry.register(name)` on a function or class, or `register(name, entry)`."""
        def add(item: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered ({self._entries[name]!r})")
            self._entries[name] = item
            return item
        return add if entry is None else add(entry)

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def get(self, name: str, where: str) -> T:
        """The entry registered as `name`; `where` is the config field that named it."""
        if name not in self._entries:
            raise ConfigError(f"{where}: unknown {self.kind} {name!r} (registered: {', '.join(self.names())})")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)


