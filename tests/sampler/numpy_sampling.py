"""Independent numpy (float64) references for the sampler tests: the filtered sampling
distribution, and a model whose next-token distribution is known."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from openvlthinker.models.decoder import DecoderConfig
from openvlthinker.models.vlm import VLM, VLMConfig


def log_softmax(x):
  x = np.asarray(x, np.float64)
  finite = np.isfinite(x)
  top = np.max(np.where(finite, x, -np.inf), axis=-1, keepdims=True)
  z = np.where(finite, np.exp(x - top), 0.0)
  return x - top - np.log(z.sum(axis=-1, keepdims=True))


def sampling_log_probs(logits, temperature=1.0, top_k=0, top_p=1.0, banned=()):
  """log p [..., V] of the distribution the sampler draws from: banned tokens removed, logits / T,
  the k most likely kept, then the smallest most-likely set whose mass reaches top_p."""
  x = np.array(logits, np.float64)
  if banned:
    x[..., list(banned)] = -np.inf
  x = x / temperature
  keep = np.isfinite(x)
  order = np.argsort(-x, axis=-1, kind="stable")
  rank = np.argsort(order, axis=-1, kind="stable")
  if 0 < top_k < x.shape[-1]:
    keep &= rank < top_k
  if top_p < 1.0:
    p = np.exp(log_softmax(np.where(keep, x, -np.inf)))
    sorted_p = np.take_along_axis(p, order, axis=-1)
    before = np.cumsum(sorted_p, axis=-1) - sorted_p
    keep &= np.take_along_axis(before < top_p, rank, axis=-1)
  return log_softmax(np.where(keep, x, -np.inf))


def entropy(logp):
  p = np.exp(logp)
  return -np.sum(np.where(p > 0, p * np.where(p > 0, logp, 0.0), 0.0), axis=-1)


def known_distribution_model(logits: np.ndarray) -> tuple[nnx.GraphDef, nnx.State]:
  """A text model whose next-token logits are `logits` (float[V]) whatever the context.

  Every weight is zero except two: all tokens share one embedding (all ones after the sqrt(width)
  scale, which the final RMSNorm keeps), and the untied head's first row holds the logits. With zero
  output projections the blocks add nothing to the residual stream.
  """
  vocab = len(logits)
  text = DecoderConfig(vocab_size=vocab, width=8, num_layers=1, num_heads=2, num_kv_heads=1,
                       head_dim=4, mlp_dim=8, tie_embeddings=False)
  config = VLMConfig(text=text, vision=None, image_token_id=vocab - 1)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: VLM(config, rngs=nnx.Rngs(0))))
  state = jax.tree.map(lambda v: jnp.zeros(v.shape, v.dtype), abstract)
  state["decoder"]["embedding"].value = jnp.full((vocab, 8), 8 ** -0.5)
  state["decoder"]["head"].value = jnp.zeros((8, vocab)).at[0].set(jnp.asarray(logits, jnp.float32))
  return graphdef, state
