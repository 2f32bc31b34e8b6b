"""What an evaluation runs on and how it decodes: named JSON/JSONL sets and the decoding settings.

`config.eval.sets = "mathvista:/data/mathvista.jsonl,chartqa:/data/chartqa.json"` names sets in
the public OpenVLThinkerV2 record format; `config.eval.image_roots = "mathvista:/data/images"`
sets a set's image root (default: the folder of its file). Each config dataclass here checks its
own fields (`fields.check`); the config layer reports them under `eval.`.
"""
from __future__ import annotations

import dataclasses
import os
import re

from openvlthinker.fields import check, positive_int

SUITE_SET = "heldout"  # the name of the procedural suite's held-out split among the sets
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a set's name is also a file name


@dataclasses.dataclass(frozen=True)
class Decoding:
  """K samples per problem at a temperature (0: greedy, then K must be 1) and top-p; a sample
  passes (for pass@k) when its accuracy reaches pass_threshold (binary accuracies are 0 or 1; the
  threshold matters for IoU, 1 − WER and relative accuracy)."""
  num_samples: int = 1
  temperature: float = 0.0
  top_p: float = 1.0
  pass_threshold: float = 0.5

  def __post_init__(self):
    check(positive_int(self.num_samples), "num_samples", "a positive integer", self.num_samples)
    check(isinstance(self.temperature, (int, float)) and self.temperature >= 0, "temperature",
          "a number >= 0 (0 = greedy)", self.temperature)
    check(self.temperature > 0 or self.num_samples == 1, "num_samples",
          "1 with temperature=0 (greedy samples are all the same)", self.num_samples)
    check(0 < self.top_p <= 1, "top_p", "a number in (0, 1] (1 = off)", self.top_p)
    check(0 < self.pass_threshold <= 1, "pass_threshold", "a number in (0, 1]",
          self.pass_threshold)

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


@dataclasses.dataclass(frozen=True)
class EvalSet:
  """A named JSON/JSONL file of public-format records and the folder its image paths are in."""
  name: str
  path: str
  image_root: str


def _pairs(text: str, field: str, what: str) -> dict[str, str]:
  out: dict[str, str] = {}
  for part in filter(None, (p.strip() for p in (text or "").split(","))):
    name, sep, value = part.partition(":")
    check(bool(sep) and bool(_NAME.match(name)) and bool(value), field,
          f"comma-separated name:{what} pairs (names of letters, digits, '_', '-', '.')", part)
    check(name not in out, field, "each name once", name)
    out[name] = value
  return out


def parse_sets(sets: str, image_roots: str = "") -> tuple[EvalSet, ...]:
  """The sets of `eval.sets` (with their `eval.image_roots`), in the order given."""
  paths = _pairs(sets, "sets", "PATH")
  roots = _pairs(image_roots, "image_roots", "DIR")
  check(SUITE_SET not in paths, "sets", f"names other than {SUITE_SET!r} (the suite's split)",
        SUITE_SET)
  unknown = sorted(set(roots) - set(paths))
  check(not unknown, "image_roots", f"names of eval.sets ({', '.join(paths) or 'none'})",
        ", ".join(unknown))
  out = []
  for name, path in paths.items():
    check(path.endswith((".json", ".jsonl")), "sets", "a .json or .jsonl file per set",
          f"{name}:{path}")
    check(os.path.isfile(path), "sets", "existing files", f"{name}:{path} (no such file)")
    root = roots.get(name) or os.path.dirname(os.path.abspath(path))
    check(os.path.isdir(root), "image_roots", "existing directories", f"{name}:{root}")
    out.append(EvalSet(name, path, root))
  return tuple(out)
