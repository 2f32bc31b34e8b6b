"""One screen of branch coverage after `make test`: a line per package, then the modules of the
guarded areas (rl/, train/, sampler.py: the RL math and its wiring) that fall below the target.

Reads the `.coverage` data pytest-cov combined (subprocesses of the end-to-end tests included).
Exits 1 when a guarded area is below TARGET, so a change that leaves its code untested fails CI.
"""
from __future__ import annotations

import glob
import io
import os
import sys

import coverage

TARGET = 90.0
GUARDED = {"openvlthinker/rl": "openvlthinker/rl/*", "openvlthinker/train": "openvlthinker/train/*",
           "openvlthinker/sampler.py": "openvlthinker/sampler.py"}


def total(cov: coverage.Coverage, include: str) -> float | None:
  try:
    return cov.report(include=include, file=io.StringIO())
  except coverage.exceptions.NoDataError:
    return None


def main() -> int:
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  os.chdir(root)
  cov = coverage.Coverage()
  cov.load()
  packages = sorted(p for p in glob.glob("openvlthinker/*") if os.path.isdir(p)
                    and not p.endswith("__pycache__"))
  rows = [(p, total(cov, f"{p}/*")) for p in packages] + [
      ("openvlthinker/*.py", total(cov, "openvlthinker/*.py"))]
  print(f"\nbranch coverage (target {TARGET:.0f} % for {', '.join(GUARDED)}):")
  for name, pct in rows:
    if pct is not None:
      print(f"  {name:34s} {pct:5.1f} %")
  failed = []
  for name, include in GUARDED.items():
    pct = total(cov, include)
    mark = "ok" if pct is not None and pct >= TARGET else "BELOW TARGET"
    print(f"  guarded {name:26s} {pct or 0.0:5.1f} %  {mark}")
    if mark != "ok":
      failed.append(name)
      out = io.StringIO()
      cov.report(include=include, file=out, skip_covered=True, show_missing=False)
      lines = out.getvalue().splitlines()
      low = [l for l in lines[2:-2] if l.strip() and float(l.split()[-1].rstrip("%")) < TARGET]
      for line in low:
        print("     " + line)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
