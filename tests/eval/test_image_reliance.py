"""eval/image_reliance.py on the test config's model: its per-row losses are the trainer's SFT
loss (`train.sft.sft_loss`, token-weighted), it really gives each row another row's image, and a
model whose image features are constant scores the same with any image."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from openvlthinker import configuration
from openvlthinker.eval import image_reliance
from openvlthinker.train.context import build_context, record_run
from openvlthinker.train.sft import sft_loss


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
  ctx = build_context(configuration.validate(test_config.get_config()),
                      str(tmp_path_factory.mktemp("reliance")))
  record_run(ctx)  # config.json, what the command line reads
  return ctx


def batch_of(ctx):
  raw = next(iter(ctx.sft_batches()))
  return {k: jnp.asarray(raw[k]) for k in ("tokens", "input_mask", "loss_mask", "images")}


def test_row_losses_weighted_by_targets_are_the_sft_loss(ctx):
  batch = batch_of(ctx)
  rows = np.asarray(image_reliance.row_losses(ctx.initial_params, ctx.graphdef, batch))
  counts = np.asarray(batch["loss_mask"][:, 1:]).sum(1)
  want, _ = sft_loss(ctx.initial_params, ctx.graphdef, batch)
  np.testing.assert_allclose((rows * counts).sum() / counts.sum(), float(want), rtol=1e-5)


def test_other_row_images_are_another_rows(ctx):
  batch = batch_of(ctx)
  moved = image_reliance.with_images(batch, "other_row")["images"]
  np.testing.assert_array_equal(moved[1:], batch["images"][:-1])
  np.testing.assert_array_equal(moved[0], batch["images"][-1])
  assert not np.any(image_reliance.with_images(batch, "blank")["images"])
  with pytest.raises(ValueError, match="variant"):
    image_reliance.with_images(batch, "shuffled")


def test_a_model_blind_by_construction_loses_nothing_without_its_images(ctx):
  out = image_reliance.image_reliance(ctx, ctx.initial_params, batches=1)
  assert out["rows"] == ctx.config.data.batch_size
  assert any(abs(d) > 1e-4 for d in out["other_minus_own"].values())  # random weights look
  # Zero the projector's output layer: every image becomes the same (zero) features.
  blind = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.zeros_like(x) if "projector" in jax.tree_util.keystr(path)
      and "w2" in jax.tree_util.keystr(path) else x, ctx.initial_params)
  out = image_reliance.image_reliance(ctx, blind, batches=1)
  for variant in ("other_row", "blank"):
    for task, loss in out["loss"][variant].items():
      assert loss == pytest.approx(out["loss"]["own"][task], abs=1e-6), (variant, task)


def test_command_line_scores_the_runs_weights(ctx, capsys):
  out = image_reliance.main(["--workdir", ctx.workdir, "--batches", "1"])
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert printed == out and "random" in out["weights"].lower()  # no checkpoint: initial weights
  want = image_reliance.image_reliance(ctx, ctx.initial_params, batches=1)
  for variant in image_reliance.VARIANTS:
    assert out["loss"][variant] == pytest.approx(want["loss"][variant]), variant
  with pytest.raises(SystemExit):
    image_reliance.main(["--batches", "1"])  # --workdir is required
