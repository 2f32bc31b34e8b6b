"""`runner.run`, the entry point's body, in this process: `--mode=all` on the test config (with the
packed update of the pod presets, its images several tokens each) and the suite's 8 devices, then
`--mode=eval` on the checkpoints it wrote, then the same command again.

The command-line tests (`test_run.py`, marked slow) run the same code in subprocesses, where
neither mutmut's per-test function map nor a quick `-m "not slow"` run sees it; these tests check
the run's outputs against independent computations instead:
- the first SFT step's logged loss is the loss of the initial parameters on the first batch of a
  fresh data iterator, computed here;
- the update's log-probs of the sampled responses are the sampler's (ratio 1): the packed rows
  hold the right tokens, positions and image features;
- RL starts from the SFT checkpoint: the norm the run prints is the checkpoint's, and its before-RL
  evaluation is `--mode=eval` of that checkpoint; its after-RL evaluation is `--mode=eval` of the
  RL checkpoint;
- the report's counts and verdict follow from the evaluations it reports; the figures are drawn;
- rerunning a finished command trains nothing and reports the same.
"""
import contextlib
import io
import json
import math
import time

import numpy as np
import pytest

from openvlthinker import eval as eval_lib
from openvlthinker.metrics import read_jsonl

pytestmark = pytest.mark.stage
SFT_STEPS, RL_STEPS = 2, 2


def make_config(**eval_overrides):
  from configs import test as test_config
  c = test_config.get_config()
  c.sft.steps, c.rl.steps = SFT_STEPS, RL_STEPS
  c.eval.every = 1  # an evaluation after every RL step
  c.rl.packing.enabled = True  # the pod presets' update: images of several tokens packed
  c.eval.update(eval_overrides)
  return c


def run(config, workdir, mode):
  """`runner.run` with its stdout and stderr captured: (stdout, stderr)."""
  from openvlthinker.train import runner
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    runner.run(config, str(workdir), mode)
  return out.getvalue(), err.getvalue()


def read_json(path):
  with open(path) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def all_run(tmp_path_factory):
  """(workdir, stdout, seconds) of `--mode=all`: one compile for the module."""
  workdir = tmp_path_factory.mktemp("all")
  start = time.perf_counter()
  out, _ = run(make_config(), workdir, "all")
  return workdir, out, time.perf_counter() - start


def test_all_mode_trains_both_stages_evaluates_and_reports(all_run):
  workdir, out, seconds = all_run
  rows = read_jsonl(workdir / "metrics.jsonl")
  by_stage = {s: [r for r in rows if r["stage"] == s] for s in ("sft", "rl", "eval")}
  assert [r["step"] for r in by_stage["sft"]] == list(range(1, SFT_STEPS + 1))
  assert [r["step"] for r in by_stage["rl"]] == list(range(1, RL_STEPS + 1))
  assert [r["step"] for r in by_stage["eval"]] == list(range(RL_STEPS + 1))  # before RL, each step
  for r in by_stage["sft"]:
    assert math.isfinite(r["loss"]) and 0 <= r["token_accuracy"] <= 1, r
    assert r["records_dropped"] == 0 and r["target_tokens"] > 0, r
  r_cfg = make_config().rl
  for r in by_stage["rl"]:
    assert r["groups_sampled"] >= r_cfg.prompts_per_step and r["generated_tokens"] > 0, r
    assert math.isfinite(r["policy_loss"]) and r["skipped_steps_total"] == 0, r
    assert abs(r["ratio_mean"] - 1) < 1e-3, r  # the update's log-probs are the sampler's
    assert r["empty_step"] == 0.0 and 0 < r["sampling_s"] < r["step_s"] < seconds, r
    assert r["tokens_per_s"] == pytest.approx(r["generated_tokens"] / r["step_s"]), r
    assert math.isfinite(r["reward/mean"]) and 0 <= r["reward_accuracy/mean"] <= 1, r
  for stage, steps in (("sft", SFT_STEPS), ("rl", RL_STEPS)):
    assert (workdir / stage / "checkpoints" / str(steps)).is_dir(), stage

  # The recorded config rebuilds this run.
  from openvlthinker.train.context import load_run_config
  recorded = load_run_config(str(workdir))
  assert recorded.to_dict() == json.loads(make_config().to_json_best_effort())

  # RL started from the SFT checkpoint, said with its parameter norm (checked in the eval test).
  start = f"rl: starting from sft step {SFT_STEPS} ({workdir / 'sft' / 'checkpoints' / str(SFT_STEPS)})"
  assert start in out, out[:2000]

  # The report: its counts and verdict follow from the two evaluations it reports.
  summary = read_json(workdir / "eval_summary.json")
  before = {k: np.asarray(v, np.float64) for k, v in summary["before_rl"].items()}
  after = {k: np.asarray(v, np.float64) for k, v in summary["after_rl"].items()}
  assert summary["improved_tasks"] == int(np.sum(after["overall"] > before["overall"] + 1e-9))
  present = np.isfinite(before["accuracy"]) & np.isfinite(after["accuracy"])
  assert summary["tasks_evaluated"] == int(present.sum()) > 0
  assert summary["mean_accuracy_before"] == pytest.approx(before["accuracy"][present].mean())
  assert summary["mean_accuracy_after"] == pytest.approx(after["accuracy"][present].mean())
  for name, point in (("before_rl", 0), ("after_rl", RL_STEPS)):  # what the stage evaluated
    evaluated = read_json(workdir / "eval" / f"rl_{point}" / "summary.json")
    assert evaluated, name
  with open(workdir / "eval_table.md") as f:
    table = f.read()
  assert table in out and f"RL raised the held-out overall reward on {summary['improved_tasks']} " \
      f"of {int(np.sum(np.isfinite(before['overall'])))} task types." in table
  for name in ("rl_curves.png", "rl_length_entropy.png", "eval_per_task.png"):
    path = workdir / name
    assert f"wrote {path}" in out and path.stat().st_size > 1000, name


def test_the_first_sft_loss_is_the_initial_weights_loss_on_the_first_batch(all_run):
  import jax
  from openvlthinker.data import pipeline
  from openvlthinker.train import sft
  from openvlthinker.train.context import build_context
  workdir, _, _ = all_run
  ctx = build_context(make_config(), str(workdir / "fresh"))
  batch = next(ctx.sft_batches())
  device_batch = {k: ctx.sharder.put_batch(batch[k]) for k in pipeline.SFT_DEVICE_KEYS}
  loss, metrics = jax.jit(sft.sft_loss, static_argnums=1)(ctx.initial_params, ctx.graphdef,
                                                          device_batch)
  first = [r for r in read_jsonl(workdir / "metrics.jsonl") if r["stage"] == "sft"][0]
  assert first["loss"] == pytest.approx(float(loss), rel=1e-5)
  assert first["target_tokens"] == float(metrics["target_tokens"]) == batch["loss_mask"][:, 1:].sum()


def test_eval_mode_scores_the_checkpoints_the_run_evaluated(all_run):
  workdir, out, _ = all_run
  summary = read_json(workdir / "eval_summary.json")
  for spec, point, name in (("sft", f"sft_{SFT_STEPS}", "before_rl"),
                            ("", f"rl_{RL_STEPS}", "after_rl")):  # "": the newest, RL's
    eval_out, _ = run(make_config(checkpoint=spec), workdir, "eval")
    scored = read_json(workdir / "eval" / f"{point}.json")
    assert scored["weights"]["stage"] == point.split("_")[0] and \
        scored["weights"]["step"] == int(point.split("_")[1]), scored["weights"]
    for metric, values in summary[name].items():
      np.testing.assert_allclose(scored["results"][metric], values, rtol=1e-6, equal_nan=True,
                                 err_msg=f"{spec or 'rl'} {metric}")
    # The last line names both outputs: the scores' JSON and the per-problem directory.
    assert eval_out.endswith(f"\nwrote {workdir / 'eval' / point}.json and "
                             f"{workdir / 'eval' / point}/\n"), eval_out[-500:]
    # It prints the scores' table (a blank line after it) before the evaluation's summary.
    label = f"{scored['weights']['stage']}@{scored['weights']['step']}"
    table = eval_lib.format_table(
        {label: {k: np.asarray(v, np.float64) for k, v in scored["results"].items()}}, "overall")
    assert f"{table}\n\n" in eval_out, eval_out[:2000]
    if spec == "sft":  # the norm the RL stage printed when it started from these weights
      assert f"parameter norm {scored['weights']['param_norm']:.6f}" in \
          out.split("rl: starting from", 1)[1].split("\n", 1)[0]


def test_eval_mode_scores_an_older_step_and_model_init_weights(all_run, tmp_path):
  workdir, _, _ = all_run
  norms = {}
  for step in (1, SFT_STEPS):
    run(make_config(checkpoint=f"sft:{step}"), workdir, "eval")
    weights = read_json(workdir / "eval" / f"sft_{step}.json")["weights"]
    assert weights["step"] == step, weights
    assert weights["path"] == str(workdir / "sft" / "checkpoints" / str(step)), weights
    norms[step] = weights["param_norm"]
  assert norms[1] != norms[SFT_STEPS]  # step 1's own parameters, not the newest
  with pytest.raises(ValueError) as e:  # a stage without checkpoints is named
    run(make_config(checkpoint="rl"), tmp_path, "eval")
  assert str(e.value) == (f"eval.checkpoint: expected a stage with checkpoints in {tmp_path}, "
                          "got 'rl'")
  with pytest.raises(ValueError) as e:  # a step that was never saved is named, with the saved ones
    run(make_config(checkpoint="sft:7"), workdir, "eval")
  saved = list(range(1, SFT_STEPS + 1))
  assert str(e.value) == (f"eval.checkpoint: expected one of the saved sft steps {saved}, "
                          "got 'sft:7'")
  # A fresh workdir whose model.init is this run's SFT stage: its newest weights, as they are.
  init = make_config()
  init.model.init = str(workdir / "sft" / "checkpoints")
  out, _ = run(init, tmp_path, "eval")
  assert f"eval: scoring the model.init weights from {init.model.init}, parameter norm " \
      f"{norms[SFT_STEPS]:.6f}" in out, out[:2000]
  scored = read_json(next((tmp_path / "eval").glob("*.json")))
  summary = read_json(workdir / "eval_summary.json")
  np.testing.assert_allclose(scored["results"]["overall"], summary["before_rl"]["overall"],
                             rtol=1e-6, equal_nan=True)


def test_rerunning_a_finished_run_trains_nothing_and_reports_the_same(all_run):
  workdir, out, _ = all_run
  before = read_jsonl(workdir / "metrics.jsonl")
  with open(workdir / "eval_table.md") as f:
    table = f.read()
  for mode in ("all", "rl"):  # `rl` finds the SFT stage's checkpoint and starts from it
    again, _ = run(make_config(), workdir, mode)
    assert read_jsonl(workdir / "metrics.jsonl") == before, mode  # nothing redone
    assert f"rl: starting from sft step {SFT_STEPS}" in again and table in again, mode
  assert table in out


def test_a_one_step_sft_trains_its_step(all_run, tmp_path):
  config = make_config()
  config.sft.steps = 1
  run(config, tmp_path, "sft")
  (row,) = read_jsonl(tmp_path / "metrics.jsonl")
  assert (row["stage"], row["step"]) == ("sft", 1)
  # The same first step as the two-step run's: the same data, initial weights and learning rate.
  first = [r for r in read_jsonl(all_run[0] / "metrics.jsonl") if r["stage"] == "sft"][0]
  assert row["loss"] == pytest.approx(first["loss"], rel=1e-6)
  assert (tmp_path / "sft" / "checkpoints" / "1").is_dir()


def test_rl_of_zero_steps_reports_the_starting_weights_before_and_after(all_run, tmp_path):
  config = make_config(every=100)
  config.sft.steps, config.rl.steps = 1, 0
  out, _ = run(config, tmp_path, "all")
  summary = read_json(tmp_path / "eval_summary.json")
  for metric, before in summary["before_rl"].items():
    np.testing.assert_array_equal(summary["after_rl"][metric], before, err_msg=metric)
  assert summary["mean_accuracy_change"] == 0 and "RL raised the held-out overall reward on 0 " in out
  assert not (tmp_path / "rl" / "checkpoints").exists() or not any(
      (tmp_path / "rl" / "checkpoints").iterdir())


def test_a_preempted_stage_says_how_to_resume_on_stderr_and_exits_0(tmp_path, monkeypatch):
  """A stage that stopped after saving on SIGTERM (`loop.Preempted`, here raised by the SFT stage
  in place of a real signal; the context, its record and the preflight stubbed, as they run
  before): the message and how to resume on stderr, none on stdout, exit 0 (a preemption is not
  a failure)."""
  import types
  from openvlthinker.train import loop, runner

  def preempted(ctx, writer):
    raise loop.Preempted("SIGTERM: saved the sft checkpoint at step 1")

  monkeypatch.setattr(runner, "build_context",
                      lambda config, workdir: types.SimpleNamespace(config=config, workdir=workdir))
  monkeypatch.setattr(runner, "record_run", lambda ctx: None)
  monkeypatch.setattr(runner.preflight, "check", lambda ctx, mode: None)
  monkeypatch.setattr(runner.sft, "run_sft", preempted)
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
      pytest.raises(SystemExit) as e:
    runner.run(make_config(), str(tmp_path), "sft")
  assert e.value.code == 0 and out.getvalue() == ""
  assert err.getvalue() == ("SIGTERM: saved the sft checkpoint at step 1; rerun the same command "
                            "to resume\n")


def test_forward_mode_runs_the_model_once(tmp_path):
  out, _ = run(make_config(), tmp_path, "forward")
  cfg = make_config().model
  assert "'finite': True" in out and "'logits_shape': (2, " in out, out
  assert out.split("'logits_shape': (2, ")[1].split(")")[0].endswith(f", {cfg.vocab_size}"), out
