"""What an evaluation writes: `eval/<point>/<set>.jsonl` (each problem's responses, parsed answers,
reward parts, accuracy), `summary.json` and `summary.md` across sets, and the per-set accuracy
over RL steps (`eval/accuracy_over_steps.png`, from every `eval/rl_<step>/summary.json` by
`history`; `task_history` reads the same per task type of one set, for the run's `rl_curves.png`).

`<point>` names the weights: `rl_<step>` during RL (`rl_0` before the first update), or the label
of what `--mode=eval` scored (`sft_40`, `rl_120`, `init`, `random`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Sequence

import numpy as np

from openvlthinker import plots, taxonomy
from openvlthinker.eval import metrics
from openvlthinker.eval.evaluator import Samples, parsed_answer
from openvlthinker.eval.sets import SUITE_SET, Decoding

SUMMARY = "summary.json"
PLOT = "accuracy_over_steps.png"
_RL_POINT = re.compile(r"^rl_(\d+)$")


def point_name(label: str) -> str:
  """A directory name for a weights label ('rl@120' → 'rl_120')."""
  return label.replace("@", "_")


def set_summary(samples: Samples, decoding: Decoding) -> dict:
  """{"problems", "dropped", "overall": metrics, "task_type": {t: metrics}, "problem_type":
  {p: metrics}, "reward": mean overall reward} of one set (`metrics.summarize`)."""
  accuracy = samples.parts["accuracy"]
  passed = accuracy >= decoding.pass_threshold
  ks = metrics.default_ks(decoding.num_samples)
  return {
      "problems": len(samples.problems), "dropped": dict(samples.dropped),
      "overall": metrics.summarize(accuracy, passed, ks),
      "reward": float(samples.parts["overall"].mean()),
      "format": float(samples.parts["format"].mean()),
      "task_type": metrics.summarize_groups(
          accuracy, passed, [p["task_type"] for p in samples.problems], ks),
      "problem_type": metrics.summarize_groups(
          accuracy, passed, [p["problem_type"] for p in samples.problems], ks),
  }


def write_problems(path: str, samples: Samples, decoding: Decoding) -> None:
  """One JSON line per problem: what the model said and how each sample scored."""
  accuracy = samples.parts["accuracy"]
  with open(path, "w") as f:
    for i, problem in enumerate(samples.problems):
      texts = samples.texts[i]
      row = {"id": problem["uid"], "task_type": problem["task_type"],
             "problem_type": problem["problem_type"], "answer": problem["answer"],
             "options": list(problem["options"]), "responses": list(texts),
             "parsed_answers": [parsed_answer(t) for t in texts],
             **{m: samples.parts[m][i].tolist() for m in ("accuracy", "overall", "format",
                                                          "length", "unparsable")},
             "passed": (accuracy[i] >= decoding.pass_threshold).tolist()}
      f.write(json.dumps(row, ensure_ascii=False) + "\n")


def format_summary(summaries: dict[str, dict], decoding: Decoding) -> str:
  """Markdown: one row per set (mean@K ± 95 %, pass@k, reward), then one per (set, task type)."""
  k = decoding.num_samples
  ks = metrics.default_ks(k)
  how = ("greedy decoding" if decoding.greedy else
         f"{k} sample{'s' if k > 1 else ''} per problem at temperature {decoding.temperature:g}, "
         f"top-p {decoding.top_p:g}")
  head = (f"| set | problems | dropped | mean@{k} ± 95 % | "
          + " | ".join(f"pass@{j}" for j in ks) + " | reward |")
  lines = [f"Accuracy per evaluation set ({how}; a sample passes at accuracy ≥ "
           f"{decoding.pass_threshold:g}):", "", head, "|---" * (4 + len(ks) + 1) + "|"]

  def row(name, count, dropped, m, reward=""):
    cells = [name, str(count), dropped, f"{m[f'mean@{k}']:.3f} ± {m[f'mean@{k}_ci']:.3f}"]
    cells += [f"{m[f'pass@{j}']:.3f}" for j in ks] + [reward]
    return "| " + " | ".join(cells) + " |"

  for name, s in summaries.items():
    dropped = ", ".join(f"{n} {why}" for why, n in sorted(s["dropped"].items())) or "0"
    lines.append(row(f"**{name}**", s["problems"], dropped, s["overall"], f"{s['reward']:.3f}"))
    for task, m in s["task_type"].items():
      lines.append(row(f"{name} / {task}", m["problems"], "", m))
  return "\n".join(lines) + "\n"


def write_point(eval_dir: str, point: str, all_samples: Sequence[Samples], decoding: Decoding,
                weights: dict | None = None) -> dict[str, dict]:
  """Writes eval/<point>/ (each set's JSONL, summary.json, summary.md), replacing what an earlier
  evaluation of the same point wrote; returns the summaries."""
  final = os.path.join(eval_dir, point)
  out_dir = final + ".tmp"
  shutil.rmtree(out_dir, ignore_errors=True)
  os.makedirs(out_dir)
  summaries = {}
  for samples in all_samples:
    write_problems(os.path.join(out_dir, f"{samples.name}.jsonl"), samples, decoding)
    summaries[samples.name] = set_summary(samples, decoding)
  record = {"point": point, "weights": weights or {},
            "decoding": {"num_samples": decoding.num_samples,
                         "temperature": decoding.temperature, "top_p": decoding.top_p,
                         "pass_threshold": decoding.pass_threshold},
            "sets": summaries}
  with open(os.path.join(out_dir, SUMMARY), "w") as f:
    json.dump(record, f, indent=1)
  with open(os.path.join(out_dir, "summary.md"), "w") as f:
    f.write(format_summary(summaries, decoding))
  shutil.rmtree(final, ignore_errors=True)  # a point evaluated again (a resumed run, a rerun)
  os.replace(out_dir, final)
  return summaries


def _rl_points(eval_dir: str) -> list[tuple[int, dict]]:
  """[(RL step, summary.json record)] of eval/rl_*/, by step (`rl_0`: before the first update)."""
  points = []
  for name in os.listdir(eval_dir) if os.path.isdir(eval_dir) else ():
    match = _RL_POINT.match(name)
    path = os.path.join(eval_dir, name, SUMMARY)
    if match and os.path.isfile(path):
      with open(path) as f:
        points.append((int(match.group(1)), json.load(f)))
  return sorted(points, key=lambda p: p[0])


def history(eval_dir: str) -> dict[str, np.ndarray]:
  """{set: float64[n, 3] rows (RL step, mean@K, its 95 % half-width)} from eval/rl_*/."""
  out: dict[str, list] = {}
  for step, record in _rl_points(eval_dir):
    k = record["decoding"]["num_samples"]
    for name, s in record["sets"].items():
      m = s["overall"]
      out.setdefault(name, []).append((step, m[f"mean@{k}"], m[f"mean@{k}_ci"]))
  return {name: np.asarray(rows, np.float64) for name, rows in out.items()}


def task_history_set(eval_dir: str) -> str | None:
  """The set `task_history` reads by default: the suite's held-out split (`sets.SUITE_SET`) when
  any RL point evaluated it, else the first set of the earliest point; None before any point."""
  return _default_set(_rl_points(eval_dir))


def _default_set(points: list[tuple[int, dict]]) -> str | None:
  if any(SUITE_SET in record["sets"] for _, record in points):
    return SUITE_SET
  return next((name for _, record in points for name in record["sets"]), None)


def task_history(eval_dir: str, set_name: str | None = None) -> dict[str, np.ndarray]:
  """{task type: float64[n, 3] rows (RL step, mean@K, its 95 % half-width)} of one evaluation set
  (`set_name`; default `task_history_set`) from eval/rl_*/, in `taxonomy.TASK_TYPES` order. n
  counts the points whose summary has that (set, task); K is each point's samples per problem."""
  points = _rl_points(eval_dir)  # each summary.json read once
  set_name = set_name or _default_set(points)
  out: dict[str, list] = {}
  for step, record in points:
    k = record["decoding"]["num_samples"]
    for task, m in record["sets"].get(set_name, {}).get("task_type", {}).items():
      out.setdefault(task, []).append((step, m[f"mean@{k}"], m[f"mean@{k}_ci"]))
  order = {t: i for i, t in enumerate(taxonomy.TASK_TYPES)}
  return {task: np.asarray(out[task], np.float64)
          for task in sorted(out, key=lambda t: order.get(t, len(order)))}


def plot_history(eval_dir: str) -> str | None:
  """eval/accuracy_over_steps.png from the RL points written so far (None before any)."""
  series = history(eval_dir)
  if not series:
    return None
  path = os.path.join(eval_dir, PLOT)
  plots.plot_set_accuracy(series, path)
  return path
