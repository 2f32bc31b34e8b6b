"""The config schema (every field with its default) and its validation.

`configs/*.py` start from `base_config()` and change values; because the schema is locked, a
misspelled field is an error, and `validate` checks values before anything compiles, raising a
`ConfigError` whose one-line message names the field and what was expected.

The `rl.loss`, `rl.sampler` and `rl.entropy` sections are shaped like the dataclasses they build
(`PolicyLossConfig(**c.rl.loss)`, …; `build_*` below, used by the trainer too): their defaults
and their field rules come from those dataclasses, so each lives in one place. This module checks
only what spans sections (batch arithmetic, the mesh).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import ml_collections

from openvlthinker import sharding, taxonomy
from openvlthinker.fields import FieldError, positive_int
from openvlthinker.rl import losses, shaping


class ConfigError(ValueError):
  """A config field holds a value the run cannot use."""


def _per_task(value) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({t: value for t in taxonomy.TASK_TYPES})


def _defaults(cls, exclude: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
  """A config section of a dataclass's fields with its defaults."""
  return ml_collections.ConfigDict({
      f.name: f.default for f in dataclasses.fields(cls)
      if f.name not in exclude and f.default is not dataclasses.MISSING})


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  c.sharding_rules = tuple((k, v) for k, v in sharding.DEFAULT_RULES)

  c.model = ml_collections.ConfigDict(dict(
      name="vlm",                # the model family (models.registry)
      init="",                   # '' = random; or a stage's checkpoints dir of a run of this
                                 # trainer (WORKDIR/sft/checkpoints): its newest parameters; or
                                 # hf:DIR, a Hugging Face checkpoint (qwen2_5_vl, qwen3_vl)
      hf_dir="",                 # qwen families: the HF directory whose architecture, tokenizer
                                 # and image processing the model uses ('' = model.init's hf:DIR)
      vocab_size=1024, width=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64,
      mlp_dim=1024, rope_theta=10_000.0, tie_embeddings=True, dtype="float32",
      param_dtype="float32", remat=False, scan_layers=True, image_token_id=3, merge_patches=True,
      prefix_full_attention=False))
  c.model.vision = ml_collections.ConfigDict(dict(
      enabled=True, image_size=64, patch_size=8, width=128, num_layers=2, num_heads=4,
      mlp_dim=512))

  # Data: image_size and num_image_tokens follow the model; the rest maps onto DataConfig.
  c.data = ml_collections.ConfigDict(dict(
      source="suite", path="", image_root="", tfds_config="small", seq_len=192,
      batch_size=16, prompt_buckets=(64, 96, 128), max_images=1, worker_count=0,
      # json: skip (and count) records with a missing, undecodable or too large image or an
      # unusable ground truth, instead of stopping on the first; max_image_pixels from the header.
      skip_bad_records=False, max_image_pixels=100_000_000,
      # Logical shards of the training stream (data/shards.py): a global batch is one part from
      # each; a process reads whole shards. 0 = one per process. Fix it to keep a run's data
      # order when it resumes on another number of hosts.
      shards=0))
  c.data.mixture = _per_task(1.0)
  c.data.difficulty = _per_task(0)
  c.tokenizer = ml_collections.ConfigDict(dict(path=""))  # '' = the shipped suite tokenizer.

  c.sft = ml_collections.ConfigDict(dict(
      steps=300, learning_rate=1e-3, warmup_steps=20, weight_decay=0.01, grad_clip=1.0,
      decay="constant",          # after warm-up: 'constant' or 'cosine' (to end_lr_ratio × peak)
      end_lr_ratio=0.0))

  c.rl = ml_collections.ConfigDict(dict(
      steps=40,
      prompts_per_step=8,        # P prompts per rollout ...
      group_size=8,              # ... × G responses each.
      updates_per_rollout=1,     # optimizer minibatches per rollout (REFERENCE: 4).
      micro_batch_size=32,       # rows per gradient-accumulation micro-batch.
      share_prompt_forward=True,  # run each prompt once per group in the update (exact).
      learning_rate=2e-5, b1=0.9, b2=0.999, weight_decay=0.01, grad_clip=1.0,
      advantage="g2rpo",         # any name in rl.advantages' registry.
      advantage_task_key="task_type",  # 'task_type' or 'problem_type' (the public code's key).
      # Every this many steps, each task's policy-gradient norm and share on the step's first
      # minibatch (metrics grad_norm_task/<task>, grad_share/<task>): one extra gradient per
      # task. 0 = off.
      task_balance_every=0))
  # losses.PolicyLossConfig: name, clip_low/high, dual_clip, log_ratio_clamp, aggregation, kl_coef
  # (k3 KL to the initial policy; 0 = off, as the paper). fixed_length = sampler.max_new_tokens.
  c.rl.loss = _defaults(losses.PolicyLossConfig, exclude=("fixed_length", "num_tasks"))
  # sampler.SamplerConfig: stop and pad tokens come from the tokenizer, buckets from data.
  c.rl.sampler = ml_collections.ConfigDict(dict(
      max_new_tokens=96, temperature=1.0, top_k=0, top_p=1.0,
      decode_phases=4,           # the decode loop grows its cache in this many phases.
      compact=True))             # decode stops computing prompt groups once they are done.
  # train/packing.py:PackingConfig: the update packs prompts and responses into rows of
  # row_tokens (a prompt with any of its responses must fit), rows_per_micro rows per
  # micro-batch, instead of padding micro_batch_size rows to the longest response. Same loss.
  # 0 = the padded micro-batch's size: largest prompt bucket + max_new_tokens, micro_batch_size.
  c.rl.packing = ml_collections.ConfigDict(dict(enabled=False, row_tokens=0, rows_per_micro=0))
  # Dynamic filtering; a step that keeps no group trains on nothing: warned, and after
  # max_empty_steps such steps in a row the run stops.
  c.rl.filter = ml_collections.ConfigDict(dict(enabled=True, low=0.01, high=0.99, max_tries=3,
                                               max_empty_steps=5))
  # Length shaping: static thresholds below, or adaptive ones (quantiles of the lengths of correct
  # responses, rl/shaping.py) that start from them.
  c.rl.length = ml_collections.ConfigDict(dict(enabled=False, weight=0.1, adaptive=True,
                                               decay=0.9, min_count=16.0))
  # (L_min, L_low, L_high, L_max) tokens: each task's declaration (paper scale; the small
  # configs set their own).
  c.rl.length.thresholds = ml_collections.ConfigDict(dict(taxonomy.LENGTH_THRESHOLDS))
  # DAPO's overlong penalty (train/reward.py:OverlongPenalty): weight · R_over, R_over falling
  # from 0 at max_new_tokens − cache_length tokens to −1 at max_new_tokens.
  c.rl.overlong = ml_collections.ConfigDict(dict(enabled=False, cache_length=256, weight=1.0))
  # shaping.EntropyShapingConfig; estimator 'exact' or 'sampled_token' (-log π(y)); bounds per task
  # from the task declarations.
  c.rl.entropy = _defaults(shaping.EntropyShapingConfig, exclude=("h_min", "h_max", "num_tasks"))
  c.rl.entropy.h_min = ml_collections.ConfigDict(
      {t: lo for t, (lo, _) in taxonomy.ENTROPY_BOUNDS.items()})
  c.rl.entropy.h_max = ml_collections.ConfigDict(
      {t: hi for t, (_, hi) in taxonomy.ENTROPY_BOUNDS.items()})

  c.eval = ml_collections.ConfigDict(dict(every=20, num_per_task=32, batch_size=64,
                                          max_new_tokens=96))
  # Evaluation sets (eval/sets.py): the suite's held-out split (`suite`), and JSON/JSONL sets in
  # the public format, "name:PATH,name:PATH", each with an optional image root "name:DIR,..."
  # (default: its file's folder). Decoding: num_samples per problem at a temperature (0 =
  # greedy) and top-p; a sample passes (pass@k) at accuracy >= pass_threshold. batch_size counts
  # rows (prompts × num_samples).
  c.eval.update(suite=True, sets="", image_roots="")
  from openvlthinker.eval.sets import Decoding  # pylint: disable=g-import-not-at-top
  c.eval.update(_defaults(Decoding))
  # What `--mode=eval` scores: '' = the newest checkpoint of the latest stage; 'sft' | 'rl' (that
  # stage's newest); 'rl:STEP' | 'sft:STEP'; 'STEP' (of the latest stage). See train/weights.py.
  c.eval.checkpoint = ""
  c.checkpoint = ml_collections.ConfigDict(dict(every=20, keep=2))
  c.debug = ml_collections.ConfigDict(dict(nan_loss_at_rl_step=-1))  # Test hook; -1 = off.
  c.progress_bar = True
  return c


def pod_rl_recipe(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The paper's RL recipe at pod scale (REFERENCE §4), on `c`: no SFT, rollouts of 512 prompts
  × 8 responses, 4 optimizer minibatches per rollout, AdamW 2e-6, no KL, dynamic filtering,
  G²RPO by task type, 2048-token responses; JSON data in the public format."""
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  c.data.update(source="json", seq_len=4096, batch_size=256, prompt_buckets=(512, 1024, 2048),
                max_images=4, worker_count=8)
  c.sft.steps = 0
  c.rl.update(steps=1000, prompts_per_step=512, group_size=8, updates_per_rollout=4,
              micro_batch_size=256, learning_rate=2e-6, weight_decay=0.01)
  c.rl.sampler.update(max_new_tokens=2048, temperature=1.0, top_p=1.0)
  # Responses differ ~30x in length across tasks (REFERENCE §6): pack the update.
  c.rl.packing.enabled = True
  # Validation as the public code does it: sampled at temperature 0.7, top-p 0.95.
  c.eval.update(every=50, num_per_task=256, batch_size=512, max_new_tokens=2048,
                temperature=0.7, top_p=0.95)
  c.checkpoint.update(every=25, keep=3)
  c.progress_bar = False
  return c


def cpu_tiny_recipe(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A few CPU-sized SFT and RL steps (configs/test.py, the HF families' tiny presets): RL
  rollouts of 4 prompts × 4, 16-token responses, no filtering, a checkpoint every step."""
  # Few layers on a CPU: a loop over per-layer weights runs ~25% faster than the layer scan.
  c.model.scan_layers = False
  c.sft.warmup_steps = 0
  c.rl.update(steps=3, prompts_per_step=4, group_size=4, updates_per_rollout=2,
              micro_batch_size=4)
  # Length-shaping thresholds for a 16-96 token budget (the tasks declare paper-scale ones).
  c.rl.length.thresholds = {t: (8, 24, 72, 96) for t in c.rl.length.thresholds}
  c.rl.sampler.max_new_tokens = 16
  c.rl.filter.enabled = False
  c.eval.update(every=2, num_per_task=2, batch_size=12, max_new_tokens=16)
  c.checkpoint.update(every=1, keep=2)
  c.progress_bar = False
  return c


def pretrained_family(c: ml_collections.ConfigDict, name: str, image_size: int
                      ) -> ml_collections.ConfigDict:
  """`c` set up for a Hugging Face family: the architecture comes from the checkpoint
  (`--config.model.init=hf:DIR`), so the built-in model's shape fields are unused; images are
  resized to image_size² (a multiple of patch × merge)."""
  c.model.name = name
  c.model.vision.image_size = image_size
  return c

# ------------------------------------------------------------ the dataclasses the sections build

def build_loss(c) -> losses.PolicyLossConfig:
  return losses.PolicyLossConfig(**c.rl.loss, fixed_length=c.rl.sampler.max_new_tokens)


def build_sampler(c, tokenizer=None):
  """The RL sampler's config: settings from `rl.sampler`, token ids from the tokenizer (the
  defaults when None: validation checks the settings alone)."""
  from openvlthinker.data.tokenizer import sampler_ids  # pylint: disable=g-import-not-at-top
  from openvlthinker.sampler import SamplerConfig  # pylint: disable=g-import-not-at-top
  ids = {} if tokenizer is None else sampler_ids(tokenizer)
  return SamplerConfig(**c.rl.sampler, **ids, prompt_buckets=tuple(c.data.prompt_buckets))


def build_packing(c):
  """`rl.packing`, its zeros resolved: row_tokens = the largest prompt bucket + max_new_tokens,
  rows_per_micro = rl.micro_batch_size (the padded update's micro-batch, so the same memory)."""
  from openvlthinker.train.packing import PackingConfig  # pylint: disable=g-import-not-at-top
  p = c.rl.packing
  return PackingConfig(
      enabled=p.enabled,
      row_tokens=p.row_tokens or max(c.data.prompt_buckets) + c.rl.sampler.max_new_tokens,
      rows_per_micro=p.rows_per_micro or c.rl.micro_batch_size)


def build_entropy(c) -> shaping.EntropyShapingConfig:
  e = c.rl.entropy
  return shaping.EntropyShapingConfig(**{k: v for k, v in e.items() if k not in ("h_min", "h_max")},
                                      h_min=dict(e.h_min), h_max=dict(e.h_max))


# ------------------------------------------------------------------------------- validation

def _check(cond: bool, field: str, expected: str, got: Any):
  if not cond:
    raise ConfigError(f"{field}: expected {expected}, got {got!r}")


def _get(c, field: str):
  node = c
  for part in field.split("."):
    node = node[part]
  return node


def _positive(c, field: str):
  _check(positive_int(_get(c, field)), field, "a positive integer", _get(c, field))


def _choice(c, field: str, choices):
  value = _get(c, field)
  _check(value in choices, field, f"one of {tuple(choices)}", value)


_CHECKS: list[Callable[[ml_collections.ConfigDict], None]] = []


def check(fn):
  """Registers a validation rule; rules run in registration order."""
  _CHECKS.append(fn)
  return fn


def _built(prefix: str, build: Callable[[], Any]) -> Any:
  """`build()`, with a FieldError it raises reported under the config path `prefix`."""
  try:
    return build()
  except FieldError as e:
    raise ConfigError(str(e.under(prefix))) from None


@check
def _mesh(c):
  sizes = [c.mesh[a] for a in sharding.MESH_AXES]
  for axis, size in zip(sharding.MESH_AXES, sizes):
    _check(isinstance(size, int) and (size == -1 or size > 0), f"mesh.{axis}",
           "a positive integer or -1", size)
  _check(sizes.count(-1) <= 1, "mesh", "at most one axis set to -1", dict(c.mesh))


@check
def _model(c):
  from openvlthinker.models import registry  # pylint: disable=g-import-not-at-top
  _choice(c, "model.name", registry.families())
  from openvlthinker.models.hf import pretrained  # pylint: disable=g-import-not-at-top
  hf = c.model.init.startswith(pretrained.HF_PREFIX)
  _check(hf or not c.model.init or os.path.isdir(c.model.init), "model.init",
         "'' (random weights), an existing checkpoints directory or hf:DIR", c.model.init)
  if c.model.name in pretrained.FAMILIES:
    directory, _ = pretrained.checkpoint_dir(c.model)
    _check(os.path.isfile(os.path.join(directory, "config.json")),
           "model.hf_dir" if c.model.hf_dir else "model.init",
           f"a Hugging Face checkpoint directory (with a config.json) for {c.model.name}",
           directory)
  else:
    _check(not hf and not c.model.hf_dir, "model.init" if hf else "model.hf_dir",
           f"no Hugging Face checkpoint for model.name={c.model.name} (only for "
           f"{', '.join(pretrained.FAMILIES)})", c.model.init if hf else c.model.hf_dir)
  if c.model.name == "vlm":
    from openvlthinker.models.build import vlm_config  # pylint: disable=g-import-not-at-top
    _built("model", lambda: vlm_config(c.model))


@check
def _data(c):
  _choice(c, "data.source", ("suite", "tfds", "json"))
  for f in ("seq_len", "batch_size", "max_images", "max_image_pixels"):
    _positive(c, f"data.{f}")
  shards = c.data.shards
  _check(isinstance(shards, int) and not isinstance(shards, bool) and shards >= 0, "data.shards",
         "an integer >= 0 (0 = one per process)", shards)
  for field, batch in (("data.batch_size", c.data.batch_size),
                       ("rl.prompts_per_step", c.rl.prompts_per_step)):
    _check(not shards or batch % shards == 0, field,
           f"a multiple of data.shards={shards} (each shard gives an equal part)", batch)
  buckets = tuple(c.data.prompt_buckets)
  _check(bool(buckets) and list(buckets) == sorted(set(buckets)) and buckets[0] > 0,
         "data.prompt_buckets", "increasing positive lengths", buckets)
  for task, weight in c.data.mixture.items():
    _check(isinstance(weight, (int, float)) and weight >= 0, f"data.mixture.{task}",
           "a weight >= 0", weight)
  _check(sum(c.data.mixture.values()) > 0, "data.mixture", "at least one positive weight",
         dict(c.data.mixture))


# Files are read and written with the OS's file API: a bucket is used through a mount (gcsfuse),
# the same path on every host.
MOUNT_HINT = ("a local path or a mounted bucket (URLs are not read directly: mount the bucket, "
              "e.g. `launch/tpu_pod.sh setup --bucket=NAME` mounts gs://NAME at /gcs/NAME on "
              "every host)")


def check_local_path(field: str, path: str) -> None:
  """Raises ConfigError naming `field` when `path` is a URL (gs://, s3://, ...)."""
  _check("://" not in path, field, MOUNT_HINT, path)


@check
def _paths(c):
  """Local files the run reads exist: found now, not after a model is built or SFT has run."""
  for field in ("data.path", "data.image_root", "tokenizer.path", "model.init", "eval.sets",
                "eval.image_roots"):
    check_local_path(field, _get(c, field))
  if c.data.source == "json" and c.data.path:
    _check(os.path.isfile(c.data.path), "data.path", "an existing .json or .jsonl file",
           c.data.path)
  elif c.data.source == "tfds" and c.data.path:
    _check(os.path.isdir(c.data.path), "data.path", "an existing TFDS data_dir", c.data.path)
  _check(not c.data.image_root or os.path.isdir(c.data.image_root), "data.image_root",
         "'' (the data file's directory) or an existing directory", c.data.image_root)
  _check(not c.tokenizer.path or os.path.isfile(c.tokenizer.path), "tokenizer.path",
         "'' (the shipped tokenizer) or an existing SentencePiece model file", c.tokenizer.path)


@check
def _sft(c):
  _check(isinstance(c.sft.steps, int) and c.sft.steps >= 0, "sft.steps", "an integer >= 0",
         c.sft.steps)
  _choice(c, "sft.decay", ("constant", "cosine"))
  from openvlthinker.train.sft import sft_optimizer  # pylint: disable=g-import-not-at-top
  _built("sft", lambda: sft_optimizer(c.sft))


@check
def _rl(c):
  r = c.rl
  _check(isinstance(r.steps, int) and r.steps >= 0, "rl.steps", "an integer >= 0", r.steps)
  for f in ("prompts_per_step", "group_size", "updates_per_rollout", "micro_batch_size"):
    _positive(c, f"rl.{f}")
  _check(r.group_size >= 2, "rl.group_size", "at least 2 (advantages compare within a group)",
         r.group_size)
  _check(r.prompts_per_step % r.updates_per_rollout == 0, "rl.updates_per_rollout",
         f"a divisor of rl.prompts_per_step={r.prompts_per_step}", r.updates_per_rollout)
  rows = r.prompts_per_step * r.group_size // r.updates_per_rollout
  _check(rows % r.micro_batch_size == 0, "rl.micro_batch_size",
         f"a divisor of the minibatch rows ({rows} = prompts_per_step * group_size / "
         "updates_per_rollout)", r.micro_batch_size)
  _check(not r.share_prompt_forward or r.micro_batch_size % r.group_size == 0,
         "rl.micro_batch_size", f"a multiple of rl.group_size={r.group_size} (whole groups) when "
         "rl.share_prompt_forward is on", r.micro_batch_size)
  from openvlthinker.rl import advantages  # pylint: disable=g-import-not-at-top
  _choice(c, "rl.advantage", advantages.advantage_estimators())
  _choice(c, "rl.advantage_task_key", ("task_type", "problem_type"))
  _check(isinstance(r.task_balance_every, int) and r.task_balance_every >= 0,
         "rl.task_balance_every", "an integer >= 0 (0 = off)", r.task_balance_every)
  from openvlthinker.train.rl_stage import rl_optimizer  # pylint: disable=g-import-not-at-top
  _built("rl", lambda: rl_optimizer(r))
  _built("rl.sampler", lambda: build_sampler(c))
  _built("rl.loss", lambda: build_loss(c))
  _built("rl.entropy", lambda: build_entropy(c))
  packing = _built("rl.packing", lambda: build_packing(c))
  longest = max(c.data.prompt_buckets) + r.sampler.max_new_tokens
  _check(not packing.enabled or packing.row_tokens >= longest, "rl.packing.row_tokens",
         f"at least the largest prompt bucket + rl.sampler.max_new_tokens = {longest} (a prompt "
         "with one response must fit a row)", packing.row_tokens)
  from openvlthinker.train.reward import LengthShaping  # pylint: disable=g-import-not-at-top
  _built("rl.length", lambda: LengthShaping.from_config(r.length, r.sampler.max_new_tokens))
  from openvlthinker.train.reward import OverlongPenalty  # pylint: disable=g-import-not-at-top
  _built("rl.overlong", lambda: OverlongPenalty.from_config(r.overlong, r.sampler.max_new_tokens))
  _check(0.0 <= r.filter.low < r.filter.high <= 1.0, "rl.filter.low",
         f"0 <= low < rl.filter.high={r.filter.high}", r.filter.low)
  _positive(c, "rl.filter.max_tries")
  _positive(c, "rl.filter.max_empty_steps")


@check
def _eval_checkpoint(c):
  for f in ("every", "num_per_task", "batch_size", "max_new_tokens"):
    _positive(c, f"eval.{f}")
  from openvlthinker.eval import evaluator, sets  # pylint: disable=g-import-not-at-top
  decoding = _built("eval", lambda: evaluator.decoding_from_config(c.eval))
  _check(c.eval.batch_size >= decoding.num_samples, "eval.batch_size",
         f"at least eval.num_samples={decoding.num_samples} (it counts rows: prompts × samples)",
         c.eval.batch_size)
  named = _built("eval", lambda: sets.parse_sets(c.eval.sets, c.eval.image_roots))
  _check(bool(c.eval.suite) or bool(named), "eval.sets",
         "at least one set when eval.suite=False (there would be nothing to evaluate)",
         c.eval.sets)
  from openvlthinker.train import weights  # pylint: disable=g-import-not-at-top
  _built("eval", lambda: weights.parse_spec(c.eval.checkpoint))
  _positive(c, "checkpoint.every")
  _positive(c, "checkpoint.keep")


TRAINING_MODES = ("sft", "rl", "all")


def validate(c: ml_collections.ConfigDict, mode: str = "all") -> ml_collections.ConfigDict:
  """Runs every registered rule; raises ConfigError naming the first bad field. A mode that
  trains (`TRAINING_MODES`) needs its training data; `eval` and `forward` read none."""
  for fn in _CHECKS:
    try:
      fn(c)
    except (KeyError, AttributeError) as e:
      raise ConfigError(f"config: missing field {e}") from None
  if mode in TRAINING_MODES:
    _check(c.data.source == "suite" or bool(c.data.path), "data.path",
           f"a path for data.source={c.data.source!r}", c.data.path)
  return c
