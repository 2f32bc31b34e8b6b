"""Everything a run builds once from its validated config: mesh, model, tokenizer, data configs."""
from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
import numpy as np
from flax import nnx

from openvlthinker import sharding, taxonomy
from openvlthinker.data import pipeline
from openvlthinker.data.tokenizer import load_tokenizer
from openvlthinker.models.build import build_model, vlm_config
from openvlthinker.models.vlm import VLMConfig


@dataclasses.dataclass
class Context:
  config: ml_collections.ConfigDict
  workdir: str
  sharder: sharding.Sharder
  model_config: VLMConfig
  graphdef: nnx.GraphDef
  initial_params: Any
  tokenizer: Any

  def data_config(self, batch_size: int, split: str = "train") -> pipeline.DataConfig:
    d = self.config.data
    return pipeline.DataConfig(
        source=d.source, path=d.path, image_root=d.image_root, tfds_config=d.tfds_config,
        split=split, batch_size=batch_size, seq_len=d.seq_len,
        prompt_buckets=tuple(d.prompt_buckets), image_size=self.model_config.vision.image_size,
        num_image_tokens=self.model_config.num_image_tokens, max_images=d.max_images,
        mixture=d.mixture.to_dict(), difficulty=d.difficulty.to_dict(), seed=self.config.seed,
        worker_count=d.worker_count, skip_missing_images=d.skip_missing_images)


def make_sharder(config: ml_collections.ConfigDict) -> sharding.Sharder:
  """The (data, fsdp, tensor) mesh of `config.mesh` with `config.sharding_rules`."""
  mesh = sharding.make_mesh({a: config.mesh[a] for a in sharding.MESH_AXES})
  return sharding.Sharder(mesh, tuple((k, v) for k, v in config.sharding_rules))


def build_context(config: ml_collections.ConfigDict, workdir: str) -> Context:
  sharder = make_sharder(config)
  model_config = vlm_config(config.model)
  tokenizer = load_tokenizer(config.tokenizer.path or None)
  if tokenizer.vocab_size > model_config.text.vocab_size:
    raise ValueError(f"model.vocab_size: expected at least the tokenizer's "
                     f"{tokenizer.vocab_size}, got {model_config.text.vocab_size}")
  if tokenizer.image_id != model_config.image_token_id:
    raise ValueError(f"model.image_token_id: expected the tokenizer's <image> id "
                     f"{tokenizer.image_id}, got {model_config.image_token_id}")
  model = build_model(model_config, sharder, seed=config.seed)
  graphdef, params = nnx.split(model)
  return Context(config=config, workdir=workdir, sharder=sharder, model_config=model_config,
                 graphdef=graphdef, initial_params=params, tokenizer=tokenizer)


def num_task_keys(key: str) -> int:
  """How many distinct ids `task_key_ids` can return for `key` (a static bound)."""
  return len(taxonomy.TASK_TYPES) if key == "task_type" else len(taxonomy.PROBLEM_TYPES)


def task_key_ids(problem_types, task_ids, key: str):
  """The ids G²RPO's second stage groups by: task ids, or problem-type ids (the public code)."""
  if key == "task_type":
    return np.asarray(task_ids, np.int32)
  return np.asarray([taxonomy.PROBLEM_TYPES.index(taxonomy.canonical_problem_type(p))
                     for p in problem_types], np.int32)
