"""Everything a run builds once from its validated config: mesh, model (by family name, through
`models.registry`), tokenizer, data configs."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import ml_collections
import numpy as np
from flax import nnx

from openvlthinker import sharding, taxonomy
from openvlthinker.data import pipeline, shards
from openvlthinker.data.tokenizer import load_tokenizer
from openvlthinker.models import registry
from openvlthinker.models.hf import pretrained
from openvlthinker.train import loop
from openvlthinker.models.protocol import VisionLanguageModel


@dataclasses.dataclass
class Context:
  config: ml_collections.ConfigDict
  workdir: str
  sharder: sharding.Sharder
  model: VisionLanguageModel     # the initial model (its graph and initial parameters)
  model_info: registry.FamilyInfo
  graphdef: nnx.GraphDef
  initial_params: Any
  tokenizer: Any
  # The training stream's data shards, and which are this process's.
  data_shards: shards.ShardLayout = shards.ShardLayout(count=1, first=0, owned=1)

  @property
  def uses_images(self) -> bool:
    return self.model_info.has_vision

  def data_config(self, batch_size: int, split: str = "train") -> pipeline.DataConfig:
    """The data layer's config; the image size and its token count come from the model. The
    "eval" split's shapes and prompt layout are the training data's, but it reads no training
    file (evaluation sets bring their own), so a run evaluates without data.path."""
    d = self.config.data
    size = self.config.model.vision.image_size
    image_tokens = self.model.tokens_per_image(size, size) if self.uses_images else 0
    source, path = ("suite", "") if split == "eval" else (d.source, d.path)
    return pipeline.DataConfig(
        source=source, path=path, image_root=d.image_root, tfds_config=d.tfds_config,
        split=split, batch_size=batch_size, seq_len=d.seq_len,
        prompt_buckets=tuple(d.prompt_buckets), image_size=size,
        num_image_tokens=image_tokens, max_images=d.max_images,
        mixture=d.mixture.to_dict(), difficulty=d.difficulty.to_dict(), seed=self.config.seed,
        worker_count=d.worker_count, skip_bad_records=d.skip_bad_records,
        max_image_pixels=d.max_image_pixels)

  def sft_batches(self) -> shards.ShardedBatches:
    """This process's SFT batches: its shards' parts of each global `data.batch_size` batch."""
    per_shard = self.data_shards.per_shard(self.config.data.batch_size, "data.batch_size")
    return shards.sft_batches(self.data_config(per_shard), self.tokenizer, self.data_shards)

  def rl_batches(self) -> shards.ShardedBatches:
    """This process's RL prompt batches: its shards' parts of each `rl.prompts_per_step`."""
    per_shard = self.data_shards.per_shard(self.config.rl.prompts_per_step, "rl.prompts_per_step")
    return shards.rl_batches(self.data_config(per_shard), self.tokenizer, self.data_shards)


def make_sharder(config: ml_collections.ConfigDict) -> sharding.Sharder:
  """The (data, fsdp, tensor) mesh of `config.mesh` with `config.sharding_rules`."""
  mesh = sharding.make_mesh({a: config.mesh[a] for a in sharding.MESH_AXES})
  # A config read back from JSON (`load_run_config`) holds lists: rules must stay hashable.
  return sharding.Sharder(mesh, tuple((k, v if isinstance(v, str) or v is None else tuple(v))
                                      for k, v in config.sharding_rules))


def build_context(config: ml_collections.ConfigDict, workdir: str) -> Context:
  sharder = make_sharder(config)
  model, info = registry.build(config.model, sharder, seed=config.seed)
  # A Hugging Face family brings its checkpoint's tokenizer; the built-in one uses the suite's.
  tokenizer = info.tokenizer or load_tokenizer(config.tokenizer.path or None)
  if tokenizer.vocab_size > info.vocab_size:
    raise ValueError(f"model.vocab_size: expected at least the tokenizer's "
                     f"{tokenizer.vocab_size}, got {info.vocab_size}")
  if tokenizer.image_id != info.image_token_id:
    raise ValueError(f"model.image_token_id: expected the tokenizer's <image> id "
                     f"{tokenizer.image_id}, got {info.image_token_id}")
  graphdef, params = nnx.split(model)
  # The newest parameters of another run's stage, on this run's mesh (hf:DIR was loaded by the
  # family's builder).
  if config.model.init and not config.model.init.startswith(pretrained.HF_PREFIX):
    step, params = loop.StageCheckpoints.at(config.model.init).restore_params(params)
    print(f"model.init: parameters of step {step} from {config.model.init}", flush=True)
  return Context(config=config, workdir=workdir, sharder=sharder, model=model, model_info=info,
                 graphdef=graphdef, initial_params=params, tokenizer=tokenizer,
                 data_shards=shards.ShardLayout.for_processes(config.data.get("shards", 0)))


CONFIG_FILE = "config.json"  # a run's config, written by each training run of the workdir
HF_FILES = "hf"  # an HF-initialised run's copy of its checkpoint's config, tokenizer, processor


def record_run(ctx: Context) -> None:
  """Writes the run's config (and, for an HF family, its checkpoint's non-weight files) into the
  workdir, so `generate` and `models.hf.export` can rebuild the model from the workdir alone."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index():
    return
  with open(os.path.join(ctx.workdir, CONFIG_FILE), "w") as f:
    f.write(ctx.config.to_json_best_effort(indent=2))
  if ctx.config.model.name in pretrained.FAMILIES:
    source, _ = pretrained.checkpoint_dir(ctx.config.model)
    pretrained.copy_side_files(source, os.path.join(ctx.workdir, HF_FILES))


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config the last training run of `workdir` recorded."""
  path = os.path.join(workdir, CONFIG_FILE)
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: expected the run's recorded config ({e})") from None


def task_key_ids(problem_types, task_ids, key: str):
  """The ids G²RPO's second stage groups by: task ids, or problem-type ids (the public code)."""
  if key == "task_type":
    return np.asarray(task_ids, np.int32)
  return np.asarray([taxonomy.PROBLEM_TYPES.index(taxonomy.canonical_problem_type(p))
                     for p in problem_types], np.int32)
