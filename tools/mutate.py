"""`make mutate`: mutmut over the modules setup.cfg names, all of them or a seeded random sample,
and the kill rate with its 95 % interval, overall and per area.

  python tools/mutate.py [--sample=N] [--seed=S] [PATTERN ...]

All ~10,000 mutants take days on 2 cores (each runs the fast tests that reach its function,
many of which trace and compile JAX), so `--sample=N` runs N mutants drawn uniformly at random
(seeded): an unbiased estimate of the kill rate, with a Wilson interval for its sampling error.
mutmut names its mutants only once it has generated them, so a sampled run first lets mutmut
generate them and record which tests reach which function (a run that matches no mutant),
then runs the sample. (Never run `mutmut print-time-estimates` alone: it drops that mapping, as
mutmut 3.8 knows the functions' hashes only in a run that generated the mutants.)

Survivors examined by hand and found equivalent (the program computes the same either way) are
listed with their changed line and a reason in tools/equivalent_mutants.txt; they leave the
mutation score's denominator (killed / (run - equivalent), the usual definition), and the raw kill
rate is reported beside it. A listed mutant whose diff no longer matches counts as a survivor.

Writes mutants/survivors.txt (each surviving mutant's name and diff, equivalents marked) and
mutants/kill_rate.json; prints the summary. Rerunning continues: mutmut keeps each mutant's result.
"""
from __future__ import annotations

import argparse
import collections
import fnmatch
import glob
import json
import math
import os
import random
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MUTMUT = [os.path.join(os.path.dirname(sys.executable), "mutmut")]
MATCHES_NOTHING = "openvlthinker.__no_mutant__*"
# mutmut's exit-code statuses (mutmut.stats.status_by_exit_code) folded into what a kill rate
# counts: a timeout or a crash of the tests is the mutant detected.
KILLED = {"killed", "timeout", "segfault", "caught by type check"}
NOT_RUN = {"skipped", "not checked", "check was interrupted by user"}
EQUIVALENT_LIST = os.path.join(ROOT, "tools", "equivalent_mutants.txt")


def read_equivalents(path: str = EQUIVALENT_LIST) -> dict[str, str]:
  """{mutant name: its changed line} of the mutants examined and found equivalent (the file's
  format is in its header)."""
  with open(path) as f:
    text = "\n".join(line.rstrip() for line in f if not line.startswith("#"))
  out = {}
  for block in text.strip().split("\n\n"):
    name, changed, *why = block.strip().splitlines()
    if not changed.startswith("+") or not why or name in out:
      raise ValueError(f"{path}: {name}: expected one block of the name, the changed line "
                       f"(+...) and why it is equivalent")
    out[name] = changed
  return out


def changed_lines(diff: str) -> list[str]:
  """The lines a mutant's diff adds ("+..."), without the file header."""
  return [line.rstrip() for line in diff.splitlines()
          if line.startswith("+") and not line.startswith("+++")]


def _exit_codes() -> dict[str, int | None]:
  """{mutant name: mutmut's exit code (None: not run)} from its .meta files, one per module."""
  out = {}
  for meta in glob.glob(os.path.join(ROOT, "mutants", "**", "*.py.meta"), recursive=True):
    with open(meta) as f:
      out.update(json.load(f)["exit_code_by_key"])
  return out


def mutant_names() -> list[str]:
  """Every generated mutant's name, sorted."""
  return sorted(_exit_codes())


def statuses() -> dict[str, str]:
  """{mutant name: mutmut's status} of every generated mutant."""
  from mutmut.stats import status_by_exit_code
  return {name: status_by_exit_code[code] for name, code in _exit_codes().items()}


def matches(name: str, patterns: list[str]) -> bool:
  """Whether `name` is one of `patterns` (mutmut names or fnmatch patterns); all, when none."""
  return not patterns or any(name == p or fnmatch.fnmatch(name, p) for p in patterns)


def area(name: str) -> str:
  """The guarded area a mutant belongs to: openvlthinker.rl.x.f__mutmut_3 -> openvlthinker/rl."""
  parts = name.split(".")
  return "/".join(parts[:2]) + (".py" if parts[1] == "sampler" else "")


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
  """The 95 % Wilson score interval of a proportion k / n (sound near 0 and 1, unlike k/n ± z·se)."""
  if n == 0:
    return 0.0, 1.0
  p = k / n
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  return max(0.0, centre - half), min(1.0, centre + half)


def summary(names: list[str], status: dict[str, str], equivalent: set[str]) -> dict:
  """Kill rate over the mutants in `names` that ran, and the mutation score over those that are
  not `equivalent`, overall and per area, with 95 % intervals."""
  groups = collections.defaultdict(list)
  for name in names:
    groups["all"].append(name)
    groups[area(name)].append(name)
  out = {}
  for group, members in sorted(groups.items()):
    counts = collections.Counter(status.get(n, "not checked") for n in members)
    ran = sum(v for k, v in counts.items() if k not in NOT_RUN)
    killed = sum(v for k, v in counts.items() if k in KILLED)
    same = sum(n in equivalent for n in members)
    out[group] = {"mutants": len(members), "ran": ran, "killed": killed, "equivalent": same,
                  "kill_rate": killed / ran if ran else None,
                  "interval_95": list(wilson(killed, ran)),
                  "score": killed / (ran - same) if ran > same else None,
                  "score_interval_95": list(wilson(killed, ran - same)),
                  "statuses": dict(sorted(counts.items()))}
  return out


def write_survivors(names: list[str], status: dict[str, str], path: str,
                    equivalents: dict[str, str]) -> tuple[list[str], set[str]]:
  """Each mutant that ran and was not killed, with its diff (`mutmut show`), marked when
  `equivalents` lists it with this diff; returns (survivors, the equivalent ones)."""
  survivors = [n for n in names if status.get(n, "not checked") not in KILLED | NOT_RUN]
  equivalent = set()
  with open(path, "w") as f:
    for name in survivors:
      diff = subprocess.run(MUTMUT + ["show", name], cwd=ROOT, capture_output=True,
                            text=True).stdout.rstrip()
      if name in equivalents:
        if equivalents[name] in changed_lines(diff):
          equivalent.add(name)
          diff += f"\n(equivalent: {os.path.relpath(EQUIVALENT_LIST, ROOT)} says why)"
        else:
          diff += (f"\n(listed as equivalent with another change, {equivalents[name]!r}: the "
                   "function changed since; examine it again)")
      f.write(f"{diff}\n\n")
  return survivors, equivalent


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sample", type=int, default=0, help="run N mutants drawn at random")
  parser.add_argument("--seed", type=int, default=0, help="the sample's seed")
  parser.add_argument("--max-children", type=int, default=2)
  parser.add_argument("patterns", nargs="*", help="mutmut mutant names or fnmatch patterns")
  args = parser.parse_args(argv)
  run = MUTMUT + ["run", f"--max-children={args.max_children}"]
  # A mutant whose change leaves a program's HLO as it was reuses its compile (tests/conftest.py
  # would give each mutmut process a cache of its own otherwise); the demo's cache directory.
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".jax_cache"))
  if args.sample < 0:
    parser.error(f"--sample: expected a number of mutants >= 0, got {args.sample}")
  if args.sample:
    if not mutant_names() or not os.path.exists(os.path.join(ROOT, "mutants", "mutmut-stats.json")):
      # Generates the mutants and maps tests to functions, then stops: nothing matches (exit 1).
      subprocess.run(run + [MATCHES_NOTHING], cwd=ROOT, check=False)
      if not os.path.exists(os.path.join(ROOT, "mutants", "mutmut-stats.json")):
        sys.exit("mutmut could not map the tests to the mutated functions (output above)")
    pool = [n for n in mutant_names() if matches(n, args.patterns)]
    chosen = sorted(random.Random(args.seed).sample(pool, min(args.sample, len(pool))))
  else:
    chosen = list(args.patterns)
  subprocess.run(run + chosen, cwd=ROOT, check=True)

  status = statuses()
  names = chosen if args.sample else sorted(n for n in status if matches(n, args.patterns))
  survivors, equivalent = write_survivors(names, status,
                                          os.path.join(ROOT, "mutants", "survivors.txt"),
                                          read_equivalents())
  result = summary(names, status, equivalent)
  result["sample"] = {"size": args.sample, "seed": args.seed, "of": len(status)} if args.sample \
      else None
  with open(os.path.join(ROOT, "mutants", "kill_rate.json"), "w") as f:
    json.dump(result, f, indent=1)
  print(json.dumps(result, indent=1))
  whole = result["all"]
  if whole["ran"]:
    pct = lambda x: f"{100 * x:.1f}"
    print(f"killed {whole['killed']} of {whole['ran']} mutants run ({pct(whole['kill_rate'])} %, "
          f"95 % interval {'-'.join(map(pct, whole['interval_95']))} %); {len(equivalent)} of the "
          f"{len(survivors)} survivors are listed equivalent: mutation score "
          f"{pct(whole['score'] or 0)} % ({'-'.join(map(pct, whole['score_interval_95']))} %); "
          "survivors in mutants/survivors.txt")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
