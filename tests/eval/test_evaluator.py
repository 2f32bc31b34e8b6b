"""The evaluator on JSON sets, in process: greedy K = 1 equals decoding each problem alone, samples
do not depend on batching, bad records are counted, and the summary is the samples' statistics;
the per-task held-out history of written summaries and the run's figures drawn from it."""
import dataclasses
import json
import os
import sys

import jax
import matplotlib.image
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import eval_data  # noqa: E402  pylint: disable=g-import-not-at-top

from configs import test as test_config  # noqa: E402
from openvlthinker import configuration, plots, taxonomy  # noqa: E402
from openvlthinker.data import tokenizer as tokenizer_lib  # noqa: E402
from openvlthinker.eval import report  # noqa: E402
from openvlthinker.eval.evaluation import Evaluation  # noqa: E402
from openvlthinker.eval.evaluator import Samples, build_set_evaluator  # noqa: E402
from openvlthinker.eval.sets import SUITE_SET, Decoding, EvalSet  # noqa: E402
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


def fake_samples(name, accuracy_by_task, rng):
  """Samples of a set whose task-t problems have the accuracies accuracy_by_task[t] (P_t × K)."""
  problems, acc = [], []
  for task, a in accuracy_by_task.items():
    for i, row in enumerate(a):
      problems.append({"uid": f"{name}/{task}/{i}", "task_type": task,
                       "problem_type": "numerical", "answer": "1", "options": []})
      acc.append(row)
  acc = np.asarray(acc, np.float64)
  parts = {"accuracy": acc, "overall": acc + 0.5, "format": np.ones_like(acc),
           "length": rng.integers(5, 50, acc.shape).astype(np.float64),
           "unparsable": np.zeros_like(acc)}
  texts = [["<answer>1</answer>"] * acc.shape[1] for _ in problems]
  task_ids = np.asarray([taxonomy.task_id(p["task_type"]) for p in problems], np.int32)
  return Samples(name, problems, texts, parts, task_ids, {})


def fake_run(workdir, steps=(0, 10, 20), k=4, rl_steps=24):
  """A workdir with metrics.jsonl (rl records of every task) and eval/rl_<step>/ points of two sets
  (another set first, then the suite's split), plus an sft point the history must ignore; returns
  {task: [(step, mean, half-width)]} of the suite set, computed directly from the accuracies."""
  rng = np.random.default_rng(0)
  decoding = Decoding(num_samples=k, temperature=1.0)
  want: dict[str, list] = {}
  tasks = taxonomy.TASK_TYPES[:4]  # two tasks never evaluated: their panels keep the training curve
  for point in [f"rl_{step}" for step in steps] + ["sft_40"]:
    suite = {t: rng.random((3 + i, k)) for i, t in enumerate(tasks)}  # each task its own P
    other = {t: np.full((2, k), 0.9) for t in tasks}
    report.write_point(str(workdir / "eval"), point, [
        fake_samples("other", other, rng), fake_samples(SUITE_SET, suite, rng)], decoding)
    for t, a in suite.items() if point.startswith("rl_") else ():
      per_problem = a.mean(axis=1)
      half = 1.959963984540054 * per_problem.std(ddof=1) / np.sqrt(len(per_problem))
      want.setdefault(t, []).append((int(point[3:]), per_problem.mean(), half))
  with open(workdir / "metrics.jsonl", "w") as f:
    for step in range(1, rl_steps + 1):
      row = {"stage": "rl", "step": step}
      for i, t in enumerate(taxonomy.TASK_TYPES):
        row |= {f"reward_accuracy/{t}": np.clip(
                    0.3 + step / rl_steps / (1 + i) + 0.2 * rng.standard_normal(), 0, 1),
                f"length/{t}": 100 + 10 * i + 5 * rng.standard_normal(),
                f"entropy/{t}": 0.8 - 0.3 * step / rl_steps + 0.05 * rng.standard_normal()}
      f.write(json.dumps(row) + "\n")
  return want


def test_task_history_reads_each_tasks_heldout_accuracy_and_interval(tmp_path):
  want = fake_run(tmp_path)
  eval_dir = str(tmp_path / "eval")
  assert report.task_history_set(eval_dir) == SUITE_SET  # preferred over the first set, "other"
  got = report.task_history(eval_dir)
  assert list(got) == list(want)
  for task, rows in want.items():
    assert got[task].shape == (3, 3)
    np.testing.assert_allclose(got[task], np.asarray(rows), rtol=1e-12, err_msg=task)
  # Another set by name; the set-level history still reads every point, rl_0 (before RL) first.
  np.testing.assert_allclose(report.task_history(eval_dir, "other")[taxonomy.TASK_TYPES[0]],
                             [[0, 0.9, 0.0], [10, 0.9, 0.0], [20, 0.9, 0.0]], atol=1e-12)
  assert report.history(eval_dir)[SUITE_SET][:, 0].tolist() == [0, 10, 20]
  assert report.task_history(str(tmp_path / "none")) == {}


def test_write_plots_writes_the_per_task_curves(tmp_path):
  fake_run(tmp_path)
  evals = {name: {"overall": np.linspace(0.2, 0.7, taxonomy.NUM_TASKS)}
           for name in ("before_rl", "after_rl")}
  paths = plots.write_plots(str(tmp_path), evals, report.task_history(str(tmp_path / "eval")))
  assert [os.path.basename(p) for p in paths] == [
      "rl_curves.png", "rl_length_entropy.png", "eval_per_task.png"]
  for path in paths:
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) > 100, path
    assert image[..., :3].std() > 0, path  # something is drawn
