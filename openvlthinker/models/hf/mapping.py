"""Hugging Face checkpoint names ↔ our parameter paths, as a declarative table of rules.

A family lists `Rule`s: a regular expression over HF tensor names, the path of our parameter it
fills (the '.'-joined nnx state path, per layer: `decoder.blocks.{0}.attn.q`) and two small hooks
that turn the HF tensor into our layout and back. The converter (`hf/convert.py`) resolves a
per-layer path onto a stacked parameter (`decoder.blocks.attn.q`, leading "layers" axis) when the
model scans its layers, so rules never depend on that choice.

Hooks see numpy arrays and the family's config; they are pure layout changes (transpose,
reshape, split) plus the RMSNorm convention (HF multiplies by w, we by 1 + scale).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import numpy as np

Hook = Callable[[np.ndarray, Any], np.ndarray]


def same(x: np.ndarray, cfg: Any) -> np.ndarray:
  del cfg
  return x


def transpose(x: np.ndarray, cfg: Any) -> np.ndarray:
  """torch Linear weight [out, in] ↔ our [in, out]."""
  del cfg
  return np.ascontiguousarray(x.T)


def norm_to_ours(x: np.ndarray, cfg: Any) -> np.ndarray:
  """HF RMSNorm gain w → our scale (we multiply by 1 + scale)."""
  del cfg
  return x - np.asarray(1, x.dtype)


def norm_to_hf(x: np.ndarray, cfg: Any) -> np.ndarray:
  del cfg
  return x + np.asarray(1, x.dtype)


@dataclasses.dataclass(frozen=True)
class Rule:
  """One HF tensor name pattern ↔ one of our parameters.

  hf: a regex matched in full against HF names; its groups (layer indices) fill `ours`.
  ours: our parameter path template, e.g. "vision.blocks.{0}.qkv".
  to_ours(hf_array, cfg) → our array; to_hf(our_array, cfg) → the HF array (its inverse).
  """
  hf: str
  ours: str
  to_ours: Hook = same
  to_hf: Hook = same

  def match(self, name: str) -> str | None:
    """Our path for HF `name`, or None when the rule does not apply."""
    m = re.fullmatch(self.hf, name)
    return None if m is None else self.ours.format(*m.groups())

  def hf_name(self, path: str) -> str | None:
    """The HF name for our per-layer `path`, or None (inverse of `match`)."""
    pattern = re.escape(self.ours)
    for i in range(self.ours.count("{")):
      pattern = pattern.replace(re.escape("{%d}" % i), r"(\d+)")
    m = re.fullmatch(pattern, path)
    if m is None:
      return None
    name = self.hf
    for group in m.groups():  # Each (\d+) of the HF pattern, in order.
      name = name.replace(r"(\d+)", group, 1)
    return name.replace("\\.", ".")


def linear(hf_prefix: str, ours: str, bias: str | None = None) -> list[Rule]:
  r"""A torch Linear (regex prefix, e.g. r"visual\.blocks\.(\d+)\.attn\.qkv"): its weight
  [out, in] → our `ours` [in, out], and its bias → our `bias` when given."""
  rules = [Rule(hf_prefix + r"\.weight", ours, transpose, transpose)]
  if bias is not None:
    rules.append(Rule(hf_prefix + r"\.bias", bias))
  return rules


def find_rule(rules: Sequence[Rule], name: str) -> tuple[Rule, str] | None:
  """The first rule matching HF `name` and our path for it."""
  for rule in rules:
    path = rule.match(name)
    if path is not None:
      return rule, path
  return None
