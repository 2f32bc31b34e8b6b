"""The run context's data configs: the training stream reads the configured source, evaluation
always the built-in suite (evaluation sets bring their own problems), with the model's image size
and image-token count; a global batch the data shards cannot split evenly is named."""
import dataclasses

import pytest

from configs import test as test_config
from openvlthinker import configuration
from openvlthinker.data.shards import ShardLayout
from openvlthinker.train.context import build_context


@pytest.fixture(scope="module")
def json_run(tmp_path_factory):
  """(config, context) of the test config reading a JSON file: one model build for the module."""
  tmp = tmp_path_factory.mktemp("json_run")
  c = test_config.get_config()
  c.data.source, c.data.path = "json", str(tmp / "train.jsonl")
  (tmp / "train.jsonl").write_text("")  # read only when the stream starts
  return c, build_context(configuration.validate(c), str(tmp))


def test_a_json_run_trains_on_its_file_and_evaluates_on_the_suite(json_run):
  c, ctx = json_run
  train, evaluation = ctx.data_config(4), ctx.data_config(4, "eval")
  assert (train.source, train.path, train.split) == ("json", c.data.path, "train")
  assert (evaluation.source, evaluation.path, evaluation.split) == ("suite", "", "eval")
  size = c.model.vision.image_size
  for d in (train, evaluation):
    assert d.batch_size == 4 and d.image_size == size
    assert d.num_image_tokens == ctx.model.tokens_per_image(size, size) > 0


def test_a_global_batch_the_shards_cannot_split_evenly_is_named(json_run):
  _, ctx = json_run
  ctx = dataclasses.replace(ctx, data_shards=ShardLayout(count=3, first=0, owned=1))
  for iterator, field, size in ((ctx.sft_batches, "data.batch_size", ctx.config.data.batch_size),
                                (ctx.rl_batches, "rl.prompts_per_step",
                                 ctx.config.rl.prompts_per_step)):
    assert size % 3
    with pytest.raises(ValueError) as e:
      iterator()
    assert str(e.value) == (f"{field}: expected a multiple of data.shards=3 (each shard gives an "
                            f"equal part of the global batch), got {size}")


@pytest.mark.parametrize("field, expected", [
    ("vocab_size", "model.vocab_size: expected at least the tokenizer's {vocab}, got {got}"),
    ("image_token_id", "model.image_token_id: expected the tokenizer's <image> id {image}, "
                       "got {got}"),
], ids=["vocab_size", "image_token_id"])
def test_a_model_its_tokenizer_does_not_fit_is_named(json_run, monkeypatch, field, expected):
  """A model whose vocabulary is smaller than the tokenizer's (token ids past its embedding) or
  whose <image> token is another id: the field, what was expected and what the model has (the
  module's model stands in for a build that reports these)."""
  from openvlthinker.train import context
  c, ctx = json_run
  tok = ctx.tokenizer
  got = {"vocab_size": tok.vocab_size - 1, "image_token_id": tok.image_id + 1}[field]
  info = dataclasses.replace(ctx.model_info, **{field: got})
  monkeypatch.setattr(context.registry, "build", lambda *args, **kwargs: (ctx.model, info))
  with pytest.raises(ValueError) as e:
    build_context(c, ctx.workdir)
  assert str(e.value) == expected.format(vocab=tok.vocab_size, image=tok.image_id, got=got)
