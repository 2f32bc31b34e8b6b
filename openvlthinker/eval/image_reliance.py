"""Does a model look at its images? The SFT loss per task with each row's own image, with another
row's (the batch's images rolled by one row) and with blank images.

A model that reads its images loses much more with another row's image than with its own; one
that answers from the prompt alone loses the same. RL can only sharpen what the policy sees, so
this is the first thing to check when RL does not move held-out accuracy.

  python -m openvlthinker.eval.image_reliance --workdir=runs/demo --checkpoint=sft [--batches=8]

prints one JSON line: {"weights", "rows", "loss": {"own"|"other_row"|"blank": {task: nats}},
"other_minus_own": {task: nats}}. Read-only: it may run beside training on the same workdir.
"""
from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from openvlthinker import taxonomy
from openvlthinker.train import sft
from openvlthinker.train import weights as weights_lib
from openvlthinker.train.context import build_context, load_run_config

VARIANTS = ("own", "other_row", "blank")


def row_losses(params, graphdef, batch: dict) -> jax.Array:
  """float32[B]: each row's token-mean cross-entropy on its targets (`train.sft.sft_loss` is the
  token mean of the whole batch: the same terms, weighted by each row's target count)."""
  ce, mask, _ = sft.target_losses(params, graphdef, batch)
  return (ce * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)


def with_images(batch: dict, variant: str) -> dict:
  """The batch with its images as `variant` says: own, other_row (rolled by one row), blank."""
  images = batch["images"]
  if variant == "other_row":
    images = jnp.roll(images, 1, axis=0)
  elif variant == "blank":
    images = jnp.zeros_like(images)
  elif variant != "own":
    raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
  return dict(batch, images=images)


def image_reliance(ctx, params, batches: int = 8) -> dict:
  """Per-task mean of `row_losses` over `batches` SFT batches of the run's data, per variant."""
  keys = ("tokens", "input_mask", "loss_mask", "images")
  losses = jax.jit(row_losses, static_argnums=1)
  stream = iter(ctx.sft_batches())
  per_variant = {v: [] for v in VARIANTS}
  task_ids = []
  for _ in range(batches):
    raw = next(stream)
    batch = {k: jnp.asarray(raw[k]) for k in keys}
    for v in VARIANTS:
      per_variant[v].append(np.asarray(losses(params, ctx.graphdef, with_images(batch, v))))
    task_ids.append(np.asarray(raw["task_ids"]))
  task_ids = np.concatenate(task_ids)
  present = [t for t in range(taxonomy.NUM_TASKS) if np.any(task_ids == t)]
  loss = {v: {taxonomy.TASK_TYPES[t]: float(np.concatenate(rows)[task_ids == t].mean())
              for t in present} for v, rows in per_variant.items()}
  return {"rows": int(len(task_ids)), "loss": loss,
          "other_minus_own": {k: loss["other_row"][k] - loss["own"][k] for k in loss["own"]}}


def main(argv=None) -> dict:
  """The command line (module docstring); prints and returns the JSON record."""
  parser = argparse.ArgumentParser(prog="python -m openvlthinker.eval.image_reliance",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="a run's workdir (its config.json)")
  parser.add_argument("--checkpoint", default="",
                      help="as eval.checkpoint: '' (newest), sft, rl, sft:300, ...")
  parser.add_argument("--batches", type=int, default=8,
                      help="SFT batches to score (data.batch_size rows each)")
  args = parser.parse_args(argv)
  workdir = os.path.abspath(args.workdir)
  ctx = build_context(load_run_config(workdir), workdir)
  if not ctx.uses_images:
    raise SystemExit(f"image_reliance: the model of {workdir} has no vision encoder")
  chosen = weights_lib.select(ctx, args.checkpoint)
  out = {"weights": chosen.describe()} | image_reliance(ctx, chosen.params, args.batches)
  print(json.dumps(out))
  return out


if __name__ == "__main__":
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags
  main()
