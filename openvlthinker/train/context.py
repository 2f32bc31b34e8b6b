"""Everything a run builds once from its validated config: mesh, model (by family name, through
`models.registry`), tokenizer, data configs."""
from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
import numpy as np
from flax import nnx

from openvlthinker import sharding, taxonomy
from openvlthinker.data import pipeline
from openvlthinker.data.tokenizer import load_tokenizer
from openvlthinker.models import registry
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

  @property
  def uses_images(self) -> bool:
    return self.model_info.has_vision

  def data_config(self, batch_size: int, split: str = "train") -> pipeline.DataConfig:
    """The data layer's config; the image size and its token count come from the model."""
    d = self.config.data
    size = self.config.model.vision.image_size
    image_tokens = self.model.tokens_per_image(size, size) if self.uses_images else 0
    return pipeline.DataConfig(
        source=d.source, path=d.path, image_root=d.image_root, tfds_config=d.tfds_config,
        split=split, batch_size=batch_size, seq_len=d.seq_len,
        prompt_buckets=tuple(d.prompt_buckets), image_size=size,
        num_image_tokens=image_tokens, max_images=d.max_images,
        mixture=d.mixture.to_dict(), difficulty=d.difficulty.to_dict(), seed=self.config.seed,
        worker_count=d.worker_count, skip_bad_records=d.skip_bad_records,
        max_image_pixels=d.max_image_pixels)


def make_sharder(config: ml_collections.ConfigDict) -> sharding.Sharder:
  """The (data, fsdp, tensor) mesh of `config.mesh` with `config.sharding_rules`."""
  mesh = sharding.make_mesh({a: config.mesh[a] for a in sharding.MESH_AXES})
  return sharding.Sharder(mesh, tuple((k, v) for k, v in config.sharding_rules))


def build_context(config: ml_collections.ConfigDict, workdir: str) -> Context:
  sharder = make_sharder(config)
  tokenizer = load_tokenizer(config.tokenizer.path or None)
  model, info = registry.build(config.model, sharder, seed=config.seed)
  if tokenizer.vocab_size > info.vocab_size:
    raise ValueError(f"model.vocab_size: expected at least the tokenizer's "
                     f"{tokenizer.vocab_size}, got {info.vocab_size}")
  if tokenizer.image_id != info.image_token_id:
    raise ValueError(f"model.image_token_id: expected the tokenizer's <image> id "
                     f"{tokenizer.image_id}, got {info.image_token_id}")
  graphdef, params = nnx.split(model)
  if config.model.init:  # The newest parameters of another run's stage, on this run's mesh.
    step, params = loop.StageCheckpoints.at(config.model.init).restore_params(params)
    print(f"model.init: parameters of step {step} from {config.model.init}", flush=True)
  return Context(config=config, workdir=workdir, sharder=sharder, model=model, model_info=info,
                 graphdef=graphdef, initial_params=params, tokenizer=tokenizer)


def task_key_ids(problem_types, task_ids, key: str):
  """The ids G²RPO's second stage groups by: task ids, or problem-type ids (the public code)."""
  if key == "task_type":
    return np.asarray(task_ids, np.int32)
  return np.asarray([taxonomy.PROBLEM_TYPES.index(taxonomy.canonical_problem_type(p))
                     for p in problem_types], np.int32)
