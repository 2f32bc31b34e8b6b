"""From config to a model whose parameters are created directly sharded on the mesh."""
from __future__ import annotations

import jax
import ml_collections
from flax import nnx

from openvlthinker.fields import FieldError
from openvlthinker.models.decoder import DecoderConfig
from openvlthinker.models.vit import ViTConfig
from openvlthinker.models.vlm import VLM, VLMConfig
from openvlthinker.sharding import Sharder, state_shardings


def vlm_config(model: ml_collections.ConfigDict) -> VLMConfig:
  """The frozen model config from the `config.model` section."""
  text = DecoderConfig(
      vocab_size=model.vocab_size, width=model.width, num_layers=model.num_layers,
      num_heads=model.num_heads, num_kv_heads=model.num_kv_heads, head_dim=model.head_dim,
      mlp_dim=model.mlp_dim, rope_theta=model.rope_theta, tie_embeddings=model.tie_embeddings,
      dtype=model.dtype, param_dtype=model.param_dtype, remat=model.remat,
      scan_layers=model.scan_layers)
  vision = None
  if model.vision.enabled:
    v = model.vision
    try:
      vision = ViTConfig(image_size=v.image_size, patch_size=v.patch_size, width=v.width,
                         num_layers=v.num_layers, num_heads=v.num_heads, mlp_dim=v.mlp_dim,
                         dtype=model.dtype, param_dtype=model.param_dtype)
    except FieldError as e:  # Named as in the config: model.vision.<field>.
      raise e.under("vision") from None
  return VLMConfig(text=text, vision=vision, image_token_id=model.image_token_id,
                   merge_patches=model.merge_patches,
                   prefix_full_attention=model.prefix_full_attention)


def build_model(cfg: VLMConfig, sharder: Sharder = Sharder(), seed: int = 0) -> VLM:
  """Initialises the VLM with every parameter placed by its logical axes.

  The init function is jitted with `out_shardings`, so each device only ever materialises its own
  shard: no full copy of the parameters exists on one device.
  """
  abstract = nnx.eval_shape(lambda: VLM(cfg, sharder, rngs=nnx.Rngs(seed)))
  graphdef, abstract_state = nnx.split(abstract)
  if sharder.mesh is None:
    return nnx.merge(graphdef, nnx.state(VLM(cfg, sharder, rngs=nnx.Rngs(seed))))
  shardings = state_shardings(abstract_state, sharder)

  def init():
    return nnx.state(VLM(cfg, sharder, rngs=nnx.Rngs(seed)))

  state = jax.jit(init, out_shardings=shardings)()
  return nnx.merge(graphdef, state)
