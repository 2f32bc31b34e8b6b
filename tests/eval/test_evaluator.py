"""The evaluator on JSON sets, in process: greedy K = 1 equals decoding each problem alone, samples
do not depend on batching, bad records are counted, and the summary is the samples' statistics."""
import dataclasses
import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import eval_data  # noqa: E402  pylint: disable=g-import-not-at-top

from configs import test as test_config  # noqa: E402
from openvlthinker import configuration  # noqa: E402
from openvlthinker.data import tokenizer as tokenizer_lib  # noqa: E402
from openvlthinker.eval import report  # noqa: E402
from openvlthinker.eval.evaluation import Evaluation  # noqa: E402
from openvlthinker.eval.evaluator import build_set_evaluator  # noqa: E402
from openvlthinker.eval.sets import Decoding, EvalSet  # noqa: E402
from openvlthinker.rl import rewards  # noqa: E402
from openvlthinker.sampler import Sampler, SamplerConfig  # noqa: E402
from openvlthinker.train.context import build_context  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("sets"))
  demo = eval_data.write_set(d, "demo")
  broken = eval_data.write_set(d, "broken", per_kind=1, bad=True)
  c = test_config.get_config()
  c.eval.sets = f"demo:{demo},broken:{broken}"
  c.eval.suite = False
  ctx = build_context(configuration.validate(c), d)
  return ctx, EvalSet("demo", demo, d), EvalSet("broken", broken, d)


def with_decoding(ctx, **kw):
  """The context with other eval settings (the Context is frozen: a new config)."""
  c = ctx.config.copy_and_resolve_references()
  c.unlock()
  c.eval.update(kw)
  return dataclasses.replace(ctx, config=c)


def test_greedy_one_sample_equals_decoding_each_problem_alone(setup):
  ctx, demo, _ = setup
  evaluator = build_set_evaluator(with_decoding(ctx, batch_size=4), demo)
  samples = evaluator.sample(ctx.initial_params, jax.random.key(0))
  assert len(samples.problems) == 14 and not samples.dropped
  c = ctx.config
  sampler = Sampler(ctx.graphdef, SamplerConfig(
      max_new_tokens=c.eval.max_new_tokens, greedy=True, **tokenizer_lib.sampler_ids(ctx.tokenizer),
      prompt_buckets=tuple(c.data.prompt_buckets)), ctx.sharder)
  for i, item in enumerate(evaluator.items):
    out = sampler(ctx.initial_params, item["prompt"][None], np.ones((1, len(item["prompt"])), bool),
                  item["images"][None], jax.random.key(123))  # greedy: the key is irrelevant
    n = int(out.lengths[0])
    text = ctx.tokenizer.decode(np.asarray(out.tokens)[0, :n].tolist())
    assert samples.texts[i] == [text]
    want = rewards.score(text, item["answer"], item["problem_type"], options=item["options"])
    assert samples.parts["accuracy"][i, 0] == pytest.approx(want["accuracy"])
    assert samples.parts["overall"][i, 0] == pytest.approx(want["overall"])
    assert samples.parts["length"][i, 0] == n
  # K = 1 at temperature 0: mean@1 = pass@1 = the greedy accuracy (binary per problem here).
  summary = report.set_summary(samples, Decoding())
  accuracy = samples.parts["accuracy"][:, 0]
  assert summary["overall"]["mean@1"] == pytest.approx(accuracy.mean())
  assert summary["overall"]["pass@1"] == pytest.approx((accuracy >= 0.5).mean())


def test_samples_do_not_depend_on_how_the_set_is_batched(setup):
  ctx, demo, _ = setup
  runs = []
  for batch_size in (4, 12):  # 2 and 6 prompts of 2 samples a call
    e = build_set_evaluator(with_decoding(ctx, batch_size=batch_size, num_samples=2,
                                          temperature=1.0), demo)
    runs.append(e.sample(ctx.initial_params, jax.random.key(7)))
  assert runs[0].texts == runs[1].texts
  np.testing.assert_array_equal(runs[0].parts["accuracy"], runs[1].parts["accuracy"])
  # Two samples of a problem at temperature 1 differ (random weights, 16 tokens).
  assert sum(t[0] != t[1] for t in runs[0].texts) >= 12


def test_bad_records_are_counted_and_the_rest_evaluated(setup):
  ctx, _, broken = setup
  e = build_set_evaluator(with_decoding(ctx, batch_size=4), broken)
  assert e.dropped == {"missing_image": 1, "bad_image": 1, "unknown_type": 1}
  assert len(e.items) == 7  # one record of each kind


def test_evaluation_writes_each_sets_problems_and_summary(setup, tmp_path):
  ctx, _, _ = setup
  ctx = dataclasses.replace(with_decoding(ctx, num_samples=2, temperature=1.0),
                            workdir=str(tmp_path))
  evaluation = Evaluation.from_context(ctx)
  stale = tmp_path / "eval" / "rl_0" / "a_set_no_longer_named.jsonl"  # from an earlier evaluation
  stale.parent.mkdir(parents=True)
  stale.write_text("{}\n")
  results, summaries = evaluation(ctx.initial_params, "rl_0", {"stage": "rl", "step": 0})
  assert not stale.exists()
  assert list(summaries) == ["demo", "broken"]
  assert summaries["broken"]["dropped"] == {"missing_image": 1, "bad_image": 1,
                                            "unknown_type": 1}
  lines = open(tmp_path / "eval" / "rl_0" / "demo.jsonl").read().splitlines()
  assert len(lines) == 14
  # Without the suite, the per-task results pool both sets' 21 problems × 2 samples.
  assert np.nansum(results["count"]) == 42
  assert (tmp_path / "eval" / "rl_0" / "summary.md").read_text().count("| **") == 2
  assert os.path.isfile(tmp_path / "eval" / report.PLOT)
