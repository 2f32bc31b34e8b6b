"""One-line field errors, raised where a field is defined and named by its config path.

Config dataclasses check their own fields in `__post_init__` with `check(...)`; the config layer
builds each dataclass from its config section and re-raises with the section's path in front
(`FieldError.under`), so a rule lives in one place and the message still names
`rl.loss.clip_low`, not just `clip_low`.
"""
from __future__ import annotations

from typing import Any


class FieldError(ValueError):
  """`field: expected …, got …`; `field` is relative to the object that raised it."""

  def __init__(self, field: str, expected: str, got: Any):
    self.field, self.expected, self.got = field, expected, got
    super().__init__(f"{field}: expected {expected}, got {got!r}")

  def under(self, prefix: str) -> FieldError:
    """The same error with `prefix.` in front of the field name."""
    return FieldError(f"{prefix}.{self.field}" if prefix else self.field, self.expected, self.got)


def check(ok: bool, field: str, expected: str, got: Any) -> None:
  if not ok:
    raise FieldError(field, expected, got)


def positive_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value > 0


DTYPES = ("float32", "bfloat16")  # what a model's dtype / param_dtype field may name
