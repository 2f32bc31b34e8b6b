"""Rollout wiring without a model: `rollout.collect` with a scripted sampler (the Sampler call
signature, fixed tokens and log-probs) and the real scorer, against rows built by hand.

Covers dynamic filtering with retries (kept groups in order, tries and drops counted), invalid-row
filling when the tries run out, prompts of different buckets left-padded and concatenated,
`RLStage.advantages` (groups of G consecutive rows, the estimator's sign) and `RolloutBatch.trim`
at and around its bucket boundary. G = 3: not a power of two.
"""
import types

import jax
import numpy as np
import pytest

from advantage_reference import ref_g2rpo
from openvlthinker.rl import advantages as advantages_lib
from openvlthinker.sampler import SamplerOutput
from openvlthinker.train import batch as batch_lib
from openvlthinker.train import rollout
from openvlthinker.train.batch import RolloutBatch
from openvlthinker.train.reward import LengthShaping, TrainingReward
from openvlthinker.train.rl_stage import RESPONSE_BUCKET, RLStage
from configs import test as test_config

PAD, BOS, EOS = 0, 1, 2
RIGHT, WRONG = 4, 5  # first response tokens the scorer reads as the right / a wrong answer
P, G, LR = 3, 3, 6
BUCKETS = (8, 16)
MIXED, NONE, ALL = [RIGHT, WRONG, WRONG], [WRONG] * G, [RIGHT] * G


class DigitTokenizer:
  pad_id, eos_id = PAD, EOS

  def decode(self, ids):
    return f"<thinking>t</thinking><answer>{ids[0]}</answer>" if ids else ""


def lengths_of(b):
  return 2 + np.arange(b) % 3  # 2, 3, 4, 2, ...: rows end at different steps


class ScriptedSampler:
  """Call k (from 1) answers prompt p's sample g with first token script[k - 1][p][g], then filler,
  then EOS; its log-probs are -(k + row / 100), so a row of the rollout names its origin."""

  def __init__(self, script):
    self.script, self.calls = script, []

  def __call__(self, state, prompt_tokens, prompt_mask, images, rng, *, group_size=1,
               prompt_ids=None):
    first = np.asarray(self.script[len(self.calls)], np.int32)
    self.calls.append({"rng": rng, "images": images, "group_size": group_size, "state": state})
    k = len(self.calls)
    p, g = first.shape
    assert group_size == g and prompt_tokens.shape[0] == p
    n = prompt_mask.sum(1)
    lb = next(b for b in BUCKETS if b >= n.max())
    b = p * g
    lengths = lengths_of(b)
    tokens = np.full((b, LR), PAD, np.int32)
    mask = np.arange(LR) < lengths[:, None]
    tokens[mask] = 7
    tokens[:, 0] = first.reshape(-1)
    tokens[np.arange(b), lengths - 1] = EOS
    logp = np.where(mask, -(k + np.arange(b)[:, None] / 100), 0.0).astype(np.float32)
    prompt, prompt_mask_lb, prompt_pos = np.zeros((p, lb), np.int32), np.zeros((p, lb), bool), \
        np.zeros((p, lb), np.int32)
    for i in range(p):  # right-aligned in the bucket
      prompt[i, lb - n[i]:] = prompt_tokens[i, :n[i]]
      prompt_mask_lb[i, lb - n[i]:] = True
      prompt_pos[i, lb - n[i]:] = np.arange(n[i])
    rep = lambda x: np.repeat(x, g, axis=0)
    return SamplerOutput(
        tokens=tokens, logprobs=logp, entropies=-logp, lengths=lengths.astype(np.int32),
        response_mask=mask,
        sequence_tokens=np.concatenate([rep(prompt), tokens], 1),
        sequence_positions=np.concatenate([rep(prompt_pos), rep(n)[:, None] + np.arange(LR)], 1),
        sequence_mask=np.concatenate([rep(prompt_mask_lb), mask], 1),
        prefix_mask=np.concatenate([rep(prompt_mask_lb), np.zeros((b, LR), bool)], 1),
        prompt_index=np.repeat(np.arange(p), g).astype(np.int32), response_start=lb)


def prompt_batch(k, long):
  """Batch k of P prompts: short ones (bucket 8) or long ones (bucket 16), task ids 0, 1, 2 + k."""
  rows = [[BOS] + [10 + k] * (9 + i if long else 3 + i) for i in range(P)]
  width = max(map(len, rows))
  tokens = np.zeros((P, width), np.int32)
  mask = np.zeros((P, width), bool)
  for i, r in enumerate(rows):
    tokens[i, :len(r)], mask[i, :len(r)] = r, True
  return {"prompt_tokens": tokens, "prompt_mask": mask,
          "images": np.full((P, 1, 4, 4, 3), k, np.uint8) + np.arange(P, dtype=np.uint8)[:, None,
                                                                                      None, None, None],
          "task_ids": np.array([0, 1, 2 + k], np.int32),
          "answer": np.array([str(RIGHT)] * P), "problem_type": np.array(["numerical"] * P),
          "options": np.array([(), (), ()] + [None], object)[:-1],
          "num_dropped": np.int32(k)}


def run_collect(script, longs, *, max_tries, filter_groups=True, low=0.01, high=0.99,
                use_images=True):
  batches = [prompt_batch(k, long) for k, long in enumerate(longs, start=1)]
  g = len(script[0][0])
  sampler = ScriptedSampler(script)
  reward = TrainingReward(LengthShaping.from_config(test_config.get_config().rl.length, LR))
  thresholds = reward.thresholds(reward.init_stats())
  rng = jax.random.key(7)
  out = rollout.collect(
      sampler, "params", iter(batches), DigitTokenizer(), rng, prompts=P, group_size=g,
      filter_groups=filter_groups, low=low, high=high, max_tries=max_tries,
      reward_fn=lambda s, l, t: reward(s, l, t, thresholds),
      task_key_fn=lambda problem_types, task_ids: 10 * task_ids, use_images=use_images)
  return out, sampler, batches, rng


def expected_rows(batches, origin, width):
  """The rows a rollout of (try k, prompt p) groups must hold, prompts left-padded to `width`."""
  seq, pos, seq_mask, prefix, logp, tasks, images = [], [], [], [], [], [], []
  lengths = lengths_of(P * G)
  for k, p in origin:
    pb = batches[k - 1]
    n = int(pb["prompt_mask"][p].sum())
    for g in range(G):
      row = p * G + g
      s = np.zeros(width + LR, np.int32)
      s[width - n:width] = pb["prompt_tokens"][p, :n]
      m = np.zeros(width + LR, bool)
      m[width - n:width + lengths[row]] = True
      q = np.zeros(width + LR, np.int32)
      q[width - n:] = np.arange(n + LR)
      seq.append(s), seq_mask.append(m), pos.append(q)
      prefix.append(m & (np.arange(width + LR) < width))
      logp.append(-(k + row / 100))
      tasks.append(pb["task_ids"][p])
      images.append(pb["images"][p])
  return dict(sequence_prompt=np.stack(seq)[:, :width], sequence_positions=np.stack(pos),
              sequence_mask=np.stack(seq_mask), prefix_mask=np.stack(prefix),
              first_logprob=np.array(logp), task_ids=np.array(tasks), images=np.stack(images))


def check_rows(batch, want, width):
  assert batch.response_start == width
  np.testing.assert_array_equal(batch.sequence_tokens[:, :width], want["sequence_prompt"])
  np.testing.assert_array_equal(batch.sequence_tokens[:, width:], batch.tokens)
  np.testing.assert_array_equal(batch.sequence_positions, want["sequence_positions"])
  np.testing.assert_array_equal(batch.sequence_mask, want["sequence_mask"])
  np.testing.assert_array_equal(batch.prefix_mask, want["prefix_mask"])
  np.testing.assert_allclose(batch.old_logprobs[:, 0], want["first_logprob"], rtol=1e-6)
  np.testing.assert_array_equal(batch.task_ids, want["task_ids"])
  np.testing.assert_array_equal(batch.task_keys, 10 * want["task_ids"])
  np.testing.assert_array_equal(batch.images, want["images"])


def toy_accuracy(batch):
  return (batch.tokens[:, 0] == RIGHT).astype(np.float32)


def test_filter_retries_keep_passing_groups_in_order_across_buckets():
  # Try 1 (bucket 8) keeps groups 0 and 2; try 2 (bucket 16) has two passing groups but only one
  # slot left: it keeps its group 1. No third prompt batch is drawn.
  script = [[MIXED, NONE, MIXED], [ALL, MIXED, MIXED], [MIXED, MIXED, MIXED]]
  out, sampler, batches, rng = run_collect(script, longs=(False, True, True), max_tries=3)
  assert len(sampler.calls) == 2
  b = out.batch
  assert b.size == P * G and b.valid.all()
  check_rows(b, expected_rows(batches, [(1, 0), (1, 2), (2, 1)], width=16), width=16)
  acc = toy_accuracy(b)
  np.testing.assert_array_equal(b.accuracy, acc)
  np.testing.assert_allclose(b.reward, 0.9 * acc + 0.1 + 0.5, atol=1e-6)
  np.testing.assert_array_equal(b.advantages, 0.0)
  assert b.response_mask.sum() == b.lengths.sum()
  assert out.stats["rollout_tries"] == 2 and out.stats["groups_sampled"] == 2 * P
  assert out.stats["groups_kept"] == P and out.stats["groups_invalid"] == 0
  assert out.stats["records_dropped"] == 1 + 2
  assert out.stats["generated_tokens"] == 2 * lengths_of(P * G).sum()
  # Everything sampled is logged, filtered or not, in sampling order.
  first = np.concatenate([np.asarray(s).reshape(-1) for s in script[:2]])
  np.testing.assert_allclose(out.sampled["accuracy"], (first == RIGHT).astype(np.float32))
  np.testing.assert_array_equal(out.sampled["task_ids"], np.repeat(
      np.concatenate([batches[0]["task_ids"], batches[1]["task_ids"]]), G))
  # Each try draws with its own key, the prompts' images go to the sampler.
  for k, call in enumerate(sampler.calls):
    np.testing.assert_array_equal(jax.random.key_data(call["rng"]),
                                  jax.random.key_data(jax.random.fold_in(rng, k)))
    np.testing.assert_array_equal(call["images"], batches[k]["images"])
    assert call["state"] == "params" and call["group_size"] == G


def test_tries_run_out_fill_with_invalid_rows():
  # Try 1 (bucket 8) keeps group 1 only; try 2 (bucket 16) keeps nothing. The two missing groups
  # are try 1's rejected groups 0 and 2, invalid, with no response tokens. The empty part of try 2
  # still sets the prompt width (16).
  script = [[NONE, MIXED, ALL], [ALL, NONE, NONE]]
  out, sampler, batches, _ = run_collect(script, longs=(False, True), max_tries=2)
  b = out.batch
  assert len(sampler.calls) == 2 and b.size == P * G
  check_rows(b, expected_rows(batches, [(1, 1), (1, 0), (1, 2)], width=16), width=16)
  np.testing.assert_array_equal(b.valid, np.repeat([True, False, False], G))
  np.testing.assert_array_equal(b.response_mask[G:], False)
  np.testing.assert_array_equal(b.response_mask[:G], np.arange(LR) < b.lengths[:G, None])
  assert out.stats["groups_kept"] == 1 and out.stats["groups_invalid"] == 2
  assert out.stats["rollout_tries"] == 2 and out.stats["groups_sampled"] == 2 * P


def test_filter_off_keeps_the_first_batch_whole():
  out, sampler, batches, _ = run_collect([[NONE, ALL, MIXED]], longs=(True,), max_tries=3,
                                         filter_groups=False)
  assert len(sampler.calls) == 1 and out.batch.valid.all()
  check_rows(out.batch, expected_rows(batches, [(1, 0), (1, 1), (1, 2)], width=16), width=16)


def test_a_model_without_vision_gets_no_images():
  out, sampler, _, _ = run_collect([[MIXED, MIXED, MIXED]], longs=(False,), max_tries=1,
                                   use_images=False)
  assert sampler.calls[0]["images"] is None and out.batch.images is None


def test_filter_bounds_are_strict():
  """REFERENCE §4: keep a group when its mean accuracy is strictly between low and high."""
  script = [[[RIGHT, WRONG, WRONG, WRONG], [RIGHT, RIGHT, RIGHT, WRONG], [RIGHT, RIGHT, WRONG, WRONG]]]
  out, *_ = run_collect(script, longs=(False,), max_tries=1, low=0.25, high=0.75)
  np.testing.assert_array_equal(out.batch.valid, np.repeat([True, False, False], 4))
  np.testing.assert_array_equal(out.batch.tokens[:4, 0], script[0][2])
  assert out.stats["groups_kept"] == 1


def test_concatenate_left_pads_prompt_sides():
  out8, *_ = run_collect([[MIXED] * P], longs=(False,), max_tries=1, filter_groups=False)
  out16, *_ = run_collect([[MIXED] * P], longs=(True,), max_tries=1, filter_groups=False)
  a, b = out8.batch, out16.batch
  assert (a.response_start, b.response_start) == (8, 16)
  merged = batch_lib.concatenate([a, b])
  assert merged.response_start == 16 and merged.size == 2 * P * G
  np.testing.assert_array_equal(merged.sequence_tokens[:P * G, 8:], a.sequence_tokens)
  np.testing.assert_array_equal(merged.sequence_tokens[:P * G, :8], 0)
  np.testing.assert_array_equal(merged.sequence_mask[:P * G, :8], False)
  np.testing.assert_array_equal(merged.prefix_mask[:P * G, :8], False)
  np.testing.assert_array_equal(merged.sequence_positions[:P * G, :8], 0)
  np.testing.assert_array_equal(merged.sequence_positions[:P * G, 8:], a.sequence_positions)
  np.testing.assert_array_equal(merged.sequence_tokens[P * G:], b.sequence_tokens)
  np.testing.assert_array_equal(merged.tokens, np.concatenate([a.tokens, b.tokens]))
  with pytest.raises(ValueError, match="response_start"):
    b.left_pad_prompts(8)


# --------------------------------------------------------------------- RLStage.advantages


def test_rl_stage_advantages_use_groups_of_g_consecutive_rows():
  """`RLStage.advantages` (the method, on a stand-in `self`) over a filtered rollout: G²RPO of the
  rewards with row b in group b // G, keyed by task, 0 on invalid rows."""
  script = [[MIXED, [RIGHT, RIGHT, WRONG], [WRONG, RIGHT, WRONG]]]
  out, *_ = run_collect(script, longs=(False,), max_tries=2)
  # Groups 0 and 1 share a task key, so stage 2 mixes two groups; rows b % G would be other groups.
  b = out.batch.replace(task_keys=np.repeat([0, 0, 2], G).astype(np.int32))
  stage = types.SimpleNamespace(c=types.SimpleNamespace(rl=types.SimpleNamespace(group_size=G)),
                                advantage_fn=jax.jit(advantages_lib.batch_estimator("g2rpo")))
  got = RLStage.advantages(stage, b).advantages
  want = ref_g2rpo(b.reward.astype(np.float64), np.arange(b.size) // G, b.task_keys, b.valid)
  assert np.abs(want).max() > 0.5
  np.testing.assert_allclose(got, want, atol=1e-5)
  # With invalid rows: they get 0 and count in no group.
  b2 = b.replace(valid=np.repeat([True, True, False], G))
  got = RLStage.advantages(stage, b2).advantages
  want = ref_g2rpo(b2.reward.astype(np.float64), np.arange(b.size) // G, b2.task_keys, b2.valid)
  np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_array_equal(got[2 * G:], 0.0)


# ------------------------------------------------------------------------------- trim


def synthetic_batch(lengths, width, lb=4):
  b = len(lengths)
  lengths = np.asarray(lengths, np.int32)
  resp = np.arange(width) < lengths[:, None]
  seq = np.arange(b * (lb + width)).reshape(b, lb + width).astype(np.int32)
  z = np.zeros(b, np.float32)
  vals = (np.arange(b * width).reshape(b, width) + 1).astype(np.float32)
  return RolloutBatch(
      sequence_tokens=seq, sequence_positions=seq + 1000, sequence_mask=seq % 2 == 0,
      prefix_mask=seq % 3 == 0, tokens=seq[:, lb:], old_logprobs=-vals, entropies=vals,
      response_mask=resp, lengths=lengths, images=None, task_ids=z.astype(np.int32),
      task_keys=z.astype(np.int32), reward=z, accuracy=z, format=z, structure=z,
      length_reward=z, advantages=z, valid=np.ones(b, bool), ref_logprobs=-2 * vals,
      response_start=lb)


@pytest.mark.parametrize("lengths, width, keep", [
    ([3, RESPONSE_BUCKET, 1], 24, RESPONSE_BUCKET),  # the longest exactly at the bucket
    ([3, RESPONSE_BUCKET - 1], 24, RESPONSE_BUCKET),
    ([RESPONSE_BUCKET + 1, 2], 24, 24),              # rounds up past the width: nothing cut
    ([RESPONSE_BUCKET + 1, 2], 40, 2 * RESPONSE_BUCKET),
    ([0, 0], 24, RESPONSE_BUCKET),                   # nothing generated: one bucket
    ([5, 1], RESPONSE_BUCKET, RESPONSE_BUCKET),
])
def test_trim_keeps_every_response_token_and_aligned_sequences(lengths, width, keep):
  full = synthetic_batch(lengths, width)
  t = full.trim(RESPONSE_BUCKET)
  lb = full.response_start
  assert t.tokens.shape == (len(lengths), keep) and t.response_start == lb
  for name in ("tokens", "old_logprobs", "entropies", "response_mask", "ref_logprobs"):
    np.testing.assert_array_equal(getattr(t, name), getattr(full, name)[:, :keep], err_msg=name)
  for name in ("sequence_tokens", "sequence_positions", "sequence_mask", "prefix_mask"):
    np.testing.assert_array_equal(getattr(t, name), getattr(full, name)[:, :lb + keep],
                                  err_msg=name)
  # The response columns of the sequence are still the tokens, and no response token is lost.
  np.testing.assert_array_equal(t.sequence_tokens[:, lb:], t.tokens)
  assert t.response_mask.sum() == full.response_mask.sum()
  for name in ("lengths", "reward", "advantages", "valid", "task_ids"):
    np.testing.assert_array_equal(getattr(t, name), getattr(full, name))


@pytest.mark.parametrize("pad", [0, 1, 3])
@pytest.mark.parametrize("rope_axes", [None, 3])
def test_left_pad_prompts_by_any_width(pad, rope_axes):
  b = synthetic_batch([2, 5], 8)
  if rope_axes:  # positions with a trailing axis per rotary section (M-RoPE models)
    b = b.replace(sequence_positions=np.stack([b.sequence_positions] * rope_axes, axis=-1))
  out = b.left_pad_prompts(b.response_start + pad)
  assert out.response_start == b.response_start + pad
  for name in ("sequence_tokens", "sequence_positions", "sequence_mask", "prefix_mask"):
    got, want = getattr(out, name), getattr(b, name)
    assert got.shape == (2, want.shape[1] + pad) + want.shape[2:], name
    assert got.dtype == want.dtype, name
    np.testing.assert_array_equal(got[:, pad:], want, err_msg=name)
    np.testing.assert_array_equal(got[:, :pad], 0, err_msg=name)
  np.testing.assert_array_equal(out.tokens, b.tokens)


def test_trim_to_single_columns_when_nothing_was_generated():
  t = synthetic_batch([0, 0], 8).trim(1)  # a bucket of one column: the narrowest update shape
  assert t.tokens.shape == (2, 1) and t.sequence_tokens.shape == (2, t.response_start + 1)


def test_rl_stage_advantages_with_fewer_rows_than_task_ids():
  script = [[MIXED]]
  one = {k: v if k == "num_dropped" else v[:1] for k, v in prompt_batch(1, False).items()}
  batches = iter([one])
  reward = TrainingReward(LengthShaping.from_config(test_config.get_config().rl.length, LR))
  thresholds = reward.thresholds(reward.init_stats())
  out = rollout.collect(
      ScriptedSampler(script), None, batches, DigitTokenizer(), jax.random.key(0), prompts=1,
      group_size=G, filter_groups=False, low=0.01, high=0.99, max_tries=1,
      reward_fn=lambda s, l, t: reward(s, l, t, thresholds),
      task_key_fn=lambda problem_types, task_ids: np.full_like(task_ids, 5))  # ocr
  stage = types.SimpleNamespace(c=types.SimpleNamespace(rl=types.SimpleNamespace(group_size=G)),
                                advantage_fn=jax.jit(advantages_lib.batch_estimator("g2rpo")))
  b = out.batch
  assert b.size == G and (b.task_keys == 5).all()
  got = RLStage.advantages(stage, b).advantages
  want = ref_g2rpo(b.reward.astype(np.float64), np.arange(G) // G, np.zeros(G, np.int32), b.valid)
  assert np.abs(want).max() > 0.5
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_rollout_counts_are_summed_over_processes_and_timings_are_not(monkeypatch):
  """`_global_stats` on process 0 of two (the other's counts arrive through `multihost.concat`):
  every count of the step is the two processes' sum, its own timing stays."""
  from openvlthinker import multihost
  from openvlthinker.train import rl_stage
  mine = {"groups_sampled": 6, "groups_kept": 4, "groups_invalid": 1, "records_dropped": 0,
          "generated_tokens": 120, "sampling_s": 1.5}
  other = {"groups_sampled": 5, "groups_kept": 2, "groups_invalid": 0, "records_dropped": 3,
           "generated_tokens": 80, "sampling_s": 9.0}
  monkeypatch.setattr(multihost, "count", lambda: 2)
  monkeypatch.setattr(multihost, "concat", lambda local: np.concatenate(
      [local, np.asarray([[other[k] for k in rl_stage._SUMMED_STATS]], np.float64)]))
  got = rl_stage._global_stats(mine)
  assert got == {"groups_sampled": 11, "groups_kept": 6, "groups_invalid": 1,
                 "records_dropped": 3, "generated_tokens": 200, "sampling_s": 1.5}
  assert all(type(got[k]) is int for k in rl_stage._SUMMED_STATS)
