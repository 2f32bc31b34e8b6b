"""One evaluation point of a run: every set of `config.eval` sampled with the same weights, the
files written (`eval.report`), and the per-task means the run's report compares.

Used alike by `--mode=eval` and by the RL stage (before RL, every `eval.every` steps, after RL).
"""
from __future__ import annotations

import os
from typing import Sequence

import jax
import numpy as np

from openvlthinker import multihost
from openvlthinker.eval import report
from openvlthinker.eval.evaluator import Evaluator, build_evaluators, decoding_from_config, per_task
from openvlthinker.eval.sets import SUITE_SET, Decoding


class Evaluation:
  """`__call__(params, point, weights) -> (per-task results, {set: summary})`: samples every
  set, writes eval/<point>/ and the accuracy-over-steps plot.

  The per-task results (what `eval_table.md` and the sweep tables compare) come from the suite's
  held-out split when it is evaluated, else from all the sets together.
  """

  def __init__(self, evaluators: Sequence[Evaluator], decoding: Decoding, eval_dir: str):
    if not evaluators:
      raise ValueError("eval.sets: nothing to evaluate (eval.suite is off and no sets are named)")
    self.evaluators, self.decoding, self.eval_dir = list(evaluators), decoding, eval_dir

  @classmethod
  def from_context(cls, ctx) -> Evaluation:
    return cls(build_evaluators(ctx), decoding_from_config(ctx.config.eval),
               os.path.join(ctx.workdir, "eval"))

  @property
  def description(self) -> str:
    """What the per-task results are computed on, for the reports."""
    first, d = self.evaluators[0], self.decoding
    what = (first.description if first.name == SUITE_SET else
            "the evaluation sets " + ", ".join(e.description for e in self.evaluators))
    return what + ("; greedy decoding" if d.greedy else
                   f"; {d.num_samples} samples per problem at temperature {d.temperature:g}, "
                   f"top-p {d.top_p:g}")

  def __call__(self, params, point: str, weights: dict | None = None
               ) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    rng = jax.random.key(0)  # the same draws at every point: changes are the policy's
    all_samples = [e.sample(params, rng) for e in self.evaluators]  # all processes sample
    if multihost.is_primary():  # every process has every sample; one writes them
      summaries = report.write_point(self.eval_dir, point, all_samples, self.decoding, weights)
      report.plot_history(self.eval_dir)
    else:
      summaries = {s.name: report.set_summary(s, self.decoding) for s in all_samples}
    suite = [s for s in all_samples if s.name == SUITE_SET]
    return per_task(suite or all_samples), summaries

  def set_metrics(self, summaries: dict[str, dict]) -> dict[str, float]:
    """Scalars for metrics.jsonl / TensorBoard: each set's mean@K and pass@K."""
    k = self.decoding.num_samples
    out = {}
    for name, s in summaries.items():
      out[f"set_mean@{k}/{name}"] = s["overall"][f"mean@{k}"]
      out[f"set_pass@{k}/{name}"] = s["overall"][f"pass@{k}"]
    return out
