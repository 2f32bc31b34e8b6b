"""Dispatches a validated config to its stages and writes the run's final report.

Stages: `sft` (cold start), `rl` (G²RPO from the SFT checkpoint when there is one), `all` (both),
`eval` (the held-out evaluation of the newest parameters), `forward` (a smoke test). Each stage
resumes from its own checkpoints in the workdir, so rerunning a command continues where it stopped.
"""
from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np

from openvlthinker import eval as eval_lib
from openvlthinker import plots
from openvlthinker.metrics import MetricsWriter
from openvlthinker.train import loop, sft
from openvlthinker.train.context import build_context


def _sft_params_or_initial(ctx, writer, mode: str):
  if mode in ("sft", "all"):
    return sft.run_sft(ctx, writer)
  # `rl` / `eval` alone start from the finished SFT stage when the workdir has one.
  ckpts = loop.StageCheckpoints(ctx.workdir, "sft", ctx.config.checkpoint.keep)
  if ckpts.latest_step() is None:
    return ctx.initial_params
  return sft.run_sft(ctx, writer)  # Finished: restores and returns without training.


def report(workdir: str, evals: dict) -> str:
  table = eval_lib.format_table(evals, "overall")
  accuracy = eval_lib.format_table(evals, "accuracy")
  before, after = evals["before_rl"]["overall"], evals["after_rl"]["overall"]
  improved = int(np.sum(after > before + 1e-9))
  present = int(np.sum(np.isfinite(before)))
  text = (f"Held-out overall reward per task (greedy decoding):\n\n{table}\n\n"
          f"Held-out accuracy per task:\n\n{accuracy}\n\n"
          f"RL raised the held-out overall reward on {improved} of {present} task types.\n")
  with open(os.path.join(workdir, "eval_table.md"), "w") as f:
    f.write(text)
  with open(os.path.join(workdir, "eval_summary.json"), "w") as f:
    json.dump({name: {k: np.asarray(v).tolist() for k, v in res.items()}
               for name, res in evals.items()} | {"improved_tasks": improved}, f, indent=1)
  return text


def run(config, workdir: str, mode: str):
  if mode == "forward":
    from openvlthinker.train.smoke import forward_smoke
    print(forward_smoke(config))
    return
  os.makedirs(workdir, exist_ok=True)
  ctx = build_context(config, workdir)
  writer = MetricsWriter(workdir)
  try:
    params = _sft_params_or_initial(ctx, writer, mode)
    if mode == "sft":
      return
    if mode == "eval":
      results = eval_lib.build_evaluator(ctx)(params, jax.random.key(0))
      print(eval_lib.format_table({"eval": results}, "overall"))
      return
    from openvlthinker.train.rl_stage import RLStage
    stage = RLStage(ctx, writer)
    _, evals = stage.run(params)
    print(report(workdir, evals))
    for path in plots.write_plots(workdir, evals):
      print(f"wrote {path}")
  except loop.Preempted as e:
    print(str(e) + "; rerun the same command to resume", file=sys.stderr)
    sys.exit(0)
  finally:
    writer.close()
