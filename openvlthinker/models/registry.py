"""Model families by name (`config.model.name`): each builds a `VisionLanguageModel` whose
parameters are created directly sharded on the mesh.

Adding a family is one decorated builder here or in the family's module (imported below):
`@register_family("name")` on `fn(model_config: ConfigDict, sharder, seed) -> (model, info)`,
where `info.image_token_id` and `info.vocab_size` let the run check them against its tokenizer.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import ml_collections

from openvlthinker.registry import Registry
from openvlthinker.sharding import Sharder


@dataclasses.dataclass(frozen=True)
class FamilyInfo:
  """What the rest of a run needs to know of a built model, besides the Protocol."""
  vocab_size: int
  image_token_id: int
  has_vision: bool
  config: Any  # the family's own frozen config (e.g. VLMConfig)
  tokenizer: Any = None  # the checkpoint's own tokenizer (HF families); None: config.tokenizer


Builder = Callable[[ml_collections.ConfigDict, Sharder, int], tuple[Any, FamilyInfo]]
_FAMILIES: Registry[Builder] = Registry("model.name")
register_family = _FAMILIES.register
families = _FAMILIES.names


def build(model_config: ml_collections.ConfigDict, sharder: Sharder, seed: int
          ) -> tuple[Any, FamilyInfo]:
  """The model of `config.model` (family `model_config.name`) with random initial weights."""
  return _FAMILIES.get(model_config.name)(model_config, sharder, seed)


@register_family("vlm")
def _builtin_vlm(model_config, sharder: Sharder, seed: int):
  from openvlthinker.models.build import build_model, vlm_config  # pylint: disable=g-import-not-at-top
  cfg = vlm_config(model_config)
  return build_model(cfg, sharder, seed=seed), FamilyInfo(
      vocab_size=cfg.text.vocab_size, image_token_id=cfg.image_token_id,
      has_vision=cfg.vision is not None, config=cfg)


# The Hugging Face families (qwen2_5_vl, qwen3_vl) register themselves where they are built.
from openvlthinker.models.hf import pretrained as _pretrained  # noqa: E402,F401  pylint: disable=g-import-not-at-top,wrong-import-position
