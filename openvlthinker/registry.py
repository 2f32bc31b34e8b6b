"""A name → component table, filled by a decorator where each component is defined.

Advantage estimators, policy losses, reward functions and model families each keep one; a config
chooses a component by name and a misspelled name is a one-line error listing the choices.
"""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
  """`@table.register("name")` on a definition; `table.get("name")`; `table.names()`."""

  def __init__(self, kind: str):
    self.kind = kind
    self._items: dict[str, T] = {}

  def register(self, name: str) -> Callable[[T], T]:
    def decorate(item: T) -> T:
      if name in self._items:
        raise ValueError(f"{self.kind} {name!r} is already registered")
      self._items[name] = item
      return item
    return decorate

  def get(self, name: str) -> T:
    if name not in self._items:
      raise ValueError(f"{self.kind}: got {name!r}, expected one of {self.names()}")
    return self._items[name]

  def names(self) -> tuple[str, ...]:
    return tuple(sorted(self._items))

  def __contains__(self, name: str) -> bool:
    return name in self._items
