"""Dispatches a validated config to its stages and writes the run's final report.

Stages: `sft` (cold start), `rl` (G²RPO from the SFT checkpoint when there is one), `all` (both),
`eval` (every evaluation set of `config.eval` on the weights `eval.checkpoint` names, by default
the newest of the latest stage; `train/weights.py`), `forward` (a smoke test). Each stage resumes from its own
checkpoints in the workdir, so rerunning a command continues where it stopped. Training modes hold
the workdir's lock and run the data preflight before anything compiles.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

from openvlthinker import eval as eval_lib
from openvlthinker.eval import report as eval_report
from openvlthinker.eval.evaluation import Evaluation
from openvlthinker.eval.verdict import format_verdict, rl_verdict
from openvlthinker import plots
from openvlthinker.fields import FieldError
from openvlthinker import multihost
from openvlthinker.metrics import MetricsWriter, NullWriter
from openvlthinker.train import loop, preflight, sft
from openvlthinker.train import weights as weights_lib
from openvlthinker.train.context import build_context, record_run
from openvlthinker.train.workdir_lock import WorkdirLock


def _rl_start(ctx, writer, mode: str) -> weights_lib.Weights:
  """What RL starts from: the SFT stage's result (trained now for `all`; for `rl` the finished SFT
  stage in the workdir), else the run's initial weights, said loudly."""
  if mode == "all" or weights_lib.saved_steps(ctx, "sft"):
    params = sft.run_sft(ctx, writer)  # Finished already: restores without training.
    if ctx.config.sft.steps:
      step = ctx.config.sft.steps
      return weights_lib.Weights(params, "sft", step,
                                 os.path.join(ctx.workdir, "sft", "checkpoints", str(step)))
  start = weights_lib.initial(ctx)
  if start.is_random:
    print(f"warning: rl: no SFT checkpoint in {ctx.workdir}/sft and no model.init: RL starts "
          "from the RANDOM initial weights", file=sys.stderr, flush=True)
  return start


def evaluate(ctx) -> str:
  """`--mode=eval`: scores the weights `eval.checkpoint` names on every evaluation set; writes
  eval/<label>/ (per-problem JSONL, summary.json, summary.md) and eval/<label>.json (per task)."""
  try:
    chosen = weights_lib.select(ctx, ctx.config.eval.checkpoint)
  except FieldError as e:
    raise e.under("eval") from None
  prefix = "warning: " if chosen.is_random else ""
  print(f"{prefix}eval: scoring {chosen.describe()}", file=sys.stderr if prefix else sys.stdout,
        flush=True)
  evaluation = Evaluation.from_context(ctx)
  print(f"eval set: {evaluation.description}", flush=True)
  weights = {"stage": chosen.stage, "step": chosen.step, "path": chosen.path,
             "param_norm": chosen.param_norm}
  point = eval_report.point_name(chosen.label)
  results, summaries = evaluation(chosen.params, point, weights)
  path = os.path.join(evaluation.eval_dir, f"{point}.json")
  if multihost.is_primary():
    with open(path, "w") as f:
      json.dump({"weights": weights, "eval_set": evaluation.description,
                 "results": {k: np.asarray(v).tolist() for k, v in results.items()}}, f, indent=1)
  return (eval_lib.format_table({chosen.label: results}, "overall") + "\n\n"
          + eval_report.format_summary(summaries, evaluation.decoding)
          + f"\nwrote {path} and {os.path.join(evaluation.eval_dir, point)}/")


def report(workdir: str, evals: dict, description: str = "") -> str:
  """The run's report text, ending with RL's verdict (`eval.verdict`); process 0 also writes
  eval_table.md and eval_summary.json (per-task results of each evaluation, the verdict's keys)."""
  table = eval_lib.format_table(evals, "overall")
  eval_set = f"Evaluated on {description}.\n\n" if description else ""
  accuracy = eval_lib.format_table(evals, "accuracy")
  before, after = evals["before_rl"]["overall"], evals["after_rl"]["overall"]
  improved = int(np.sum(after > before + 1e-9))
  present = int(np.sum(np.isfinite(before)))
  verdict = rl_verdict(evals["before_rl"], evals["after_rl"])
  text = (f"{eval_set}Held-out overall reward per task:\n\n{table}\n\n"
          f"Held-out accuracy per task:\n\n{accuracy}\n\n"
          f"RL raised the held-out overall reward on {improved} of {present} task types.\n"
          f"{format_verdict(verdict)}\n")
  if not multihost.is_primary():
    return text
  with open(os.path.join(workdir, "eval_table.md"), "w") as f:
    f.write(text)
  with open(os.path.join(workdir, "eval_summary.json"), "w") as f:
    json.dump({name: {k: np.asarray(v).tolist() for k, v in res.items()}
               for name, res in evals.items()} | {"improved_tasks": improved} | verdict, f,
              indent=1)
  return text


def run(config, workdir: str, mode: str):
  if mode == "forward":
    from openvlthinker.train.smoke import forward_smoke
    print(forward_smoke(config))
    return
  os.makedirs(workdir, exist_ok=True)
  if mode == "eval":  # Reads checkpoints only: may run beside a training run on the same workdir.
    print(evaluate(build_context(config, workdir)))
    return
  with WorkdirLock(workdir):
    ctx = build_context(config, workdir)
    record_run(ctx)
    evaluation = preflight.check(ctx, mode)
    writer = MetricsWriter(workdir) if multihost.is_primary() else NullWriter()
    try:
      if mode == "sft":
        sft.run_sft(ctx, writer)
        return
      start = _rl_start(ctx, writer, mode)
      print(f"rl: starting from {start.describe()}", flush=True)
      from openvlthinker.train.rl_stage import RLStage
      stage = RLStage(ctx, writer, evaluation)
      _, evals = stage.run(start.params)
      print(report(workdir, evals, stage.evaluation.description))
      if multihost.is_primary():  # process 0 wrote eval/; it draws the figures
        heldout = eval_report.task_history(stage.evaluation.eval_dir)
        for path in plots.write_plots(workdir, evals, heldout):
          print(f"wrote {path}")
    except loop.Preempted as e:
      print(str(e) + "; rerun the same command to resume", file=sys.stderr)
      sys.exit(0)
    finally:
      writer.close()
