"""The generic HF converter on a small model of its own: a stacked (scanned) block, a list of
per-layer modules, norms and linears, loaded from float32 and bfloat16 checkpoints (single and
sharded) straight into their shardings on a (1, 4, 2) mesh, exported back and loaded again; one
HF tensor whole on the host at a time, blocks read where the hook allows; one-line errors."""
import os
import re
import weakref

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors.torch import save_file as torch_save_file

from openvlthinker.models import layers
from openvlthinker.models.decoder import stack_blocks
from openvlthinker.models.hf.convert import export_tensors, load_state
from openvlthinker.models.hf.mapping import Rule, linear, norm_to_hf, norm_to_ours
from openvlthinker.models.hf.safetensors_io import (CheckpointReader, HFCheckpointError,
                                                     write_checkpoint)
from openvlthinker.sharding import Sharder, state_shardings

V, D, M, N, H, L = 64, 32, 48, 4, 8, 3
CFG = {"width": D, "heads": N}
BF16 = np.dtype(ml_dtypes.bfloat16)
_hook_outputs = []  # weak references to what the q hook returned (whole converted tensors)


class Block(nnx.Module):
  def __init__(self, dtype, rngs):
    init = layers.fan_in_init((0,))
    self.norm = layers.RMSNorm(D, rngs=rngs)
    self.up = layers.param(rngs, init, (D, M), ("embed", "mlp"), dtype)
    self.q = layers.param(rngs, init, (D, N, H), ("embed", "heads", "head_dim"), dtype)


class Extra(nnx.Module):
  def __init__(self, dtype, rngs):
    self.w = layers.param(rngs, layers.fan_in_init((0,)), (M, D), ("mlp", "embed"), dtype)
    self.b = layers.param(rngs, nnx.initializers.zeros, (D,), ("embed",), dtype)


class Tiny(nnx.Module):
  def __init__(self, dtype="float32", *, rngs):
    self.embedding = layers.param(rngs, nnx.initializers.normal(1.0), (V, D), ("vocab", "embed"),
                                  dtype)
    self.blocks = stack_blocks([Block(dtype, rngs) for _ in range(L)])
    self.extra = nnx.List([Extra(dtype, rngs) for _ in range(2)])
    self.final_norm = layers.RMSNorm(D, rngs=rngs)


def q_to_ours(x, cfg):  # torch [N·H, D] → ours [D, N, H]: not a block-for-block hook
  y = np.ascontiguousarray(x.T.reshape(cfg["width"], cfg["heads"], -1))
  _hook_outputs.append(weakref.ref(y))
  return y


def q_to_hf(x, cfg):
  del cfg
  return np.ascontiguousarray(x.reshape(x.shape[0], -1).T)


RULES = [
    Rule(r"model\.embed_tokens\.weight", "embedding"),
    Rule(r"model\.layers\.(\d+)\.norm\.weight", "blocks.{0}.norm.scale", norm_to_ours, norm_to_hf),
    *linear(r"model\.layers\.(\d+)\.mlp\.up_proj", "blocks.{0}.up"),
    Rule(r"model\.layers\.(\d+)\.attn\.q_proj\.weight", "blocks.{0}.q", q_to_ours, q_to_hf),
    *linear(r"model\.extra\.(\d+)\.proj", "extra.{0}.w", "extra.{0}.b"),
    Rule(r"model\.norm\.weight", "final_norm.scale", norm_to_ours, norm_to_hf),
]
IGNORE = (r"lm_head\.weight",)
MESH = jax.make_mesh((1, 4, 2), ("data", "fsdp", "tensor"),
                     axis_types=(jax.sharding.AxisType.Auto,) * 3)


def hf_tensors(dtype=np.float32):
  rng = np.random.default_rng(0)
  t = {"model.embed_tokens.weight": rng.normal(size=(V, D)),
       "model.norm.weight": 1 + rng.normal(size=D), "lm_head.weight": rng.normal(size=(V, D))}
  for i in range(L):
    t[f"model.layers.{i}.norm.weight"] = 1 + 0.1 * rng.normal(size=D)
    t[f"model.layers.{i}.mlp.up_proj.weight"] = rng.normal(size=(M, D))
    t[f"model.layers.{i}.attn.q_proj.weight"] = rng.normal(size=(N * H, D))
  for i in range(2):
    t[f"model.extra.{i}.proj.weight"] = rng.normal(size=(D, M))
    t[f"model.extra.{i}.proj.bias"] = rng.normal(size=D)
  return {k: v.astype(np.float32).astype(dtype) for k, v in t.items()}


def expected_state(t, dtype=np.float32):
  """Our parameters from HF tensors `t`, written out by hand (not through the rules)."""
  f = {k: v.astype(np.float32) for k, v in t.items()}
  layer = lambda fmt: np.stack([f[fmt.format(i)] for i in range(L)])
  out = {"embedding": f["model.embed_tokens.weight"],
         "final_norm.scale": f["model.norm.weight"] - 1,
         "blocks.norm.scale": layer("model.layers.{}.norm.weight") - 1,
         "blocks.up": layer("model.layers.{}.mlp.up_proj.weight").transpose(0, 2, 1),
         # q_proj rows are (head, head_dim) pairs: [L, N·H, D] → [L, D, N, H].
         "blocks.q": layer("model.layers.{}.attn.q_proj.weight").reshape(L, N, H, D)
                     .transpose(0, 3, 1, 2)}
  for i in range(2):
    out[f"extra.{i}.w"] = f[f"model.extra.{i}.proj.weight"].T
    out[f"extra.{i}.b"] = f[f"model.extra.{i}.proj.bias"]
  # Norm scales are float32 in every model (layers.RMSNorm); the rest in the model's dtype.
  return {k: v if "norm" in k else v.astype(dtype) for k, v in out.items()}


def abstract(dtype="float32"):
  return nnx.state(nnx.eval_shape(lambda: Tiny(dtype, rngs=nnx.Rngs(0))))


def flat(state):
  return {".".join(map(str, k)): v.get_value() if isinstance(v, nnx.Variable) else v
          for k, v in nnx.to_flat_state(state)}


def save(directory, tensors, how):
  """A checkpoint of `tensors`: `how` is "torch" (one file) or a shard size for ours."""
  if how == "torch":
    os.makedirs(directory)
    torch_save_file({k: torch.from_numpy(v.astype(np.float32)).to(
        torch.bfloat16 if v.dtype == BF16 else torch.float32) for k, v in tensors.items()},
        os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
  else:
    write_checkpoint(directory, tensors.items(), max_shard_bytes=how)
  return CheckpointReader(directory)


def load_on_mesh(reader, dtype="float32", rules=RULES, ignore=IGNORE):
  state = abstract(dtype)
  shardings = state_shardings(state, Sharder(MESH))
  return load_state(state, shardings, rules, reader, CFG, ignore=ignore), flat(shardings)


@pytest.mark.parametrize("source,how", [("float32", "torch"), ("bfloat16", "torch"),
                                        ("bfloat16", 5_000)])
def test_load_places_shards_and_round_trips(tmp_path, source, how):
  tensors = hf_tensors(BF16 if source == "bfloat16" else np.float32)
  reader = save(str(tmp_path / "in"), tensors, how)
  if how != "torch":
    assert os.path.exists(tmp_path / "in" / "model.safetensors.index.json")  # sharded
  state, targets = load_on_mesh(reader)
  got, want = flat(state), expected_state(tensors)
  assert sorted(got) == sorted(want)
  for path, x in got.items():
    assert x.sharding == targets[path], path
    assert x.dtype == jnp.float32, path
    np.testing.assert_array_equal(np.asarray(x), want[path], err_msg=path)
  assert targets["blocks.up"].spec == P(None, "fsdp", "tensor")  # the mesh is really used
  assert targets["embedding"].spec == P("tensor", "fsdp")

  exported = list(export_tensors(state, RULES, CFG, dtype=tensors["model.norm.weight"].dtype))
  assert sorted(n for n, _ in exported) == sorted(set(tensors) - {"lm_head.weight"})
  for name, x in exported:
    assert x.dtype == tensors[name].dtype, name
    if "norm" in name and source == "float32":
      # float32 w - 1 + 1 rounds unless w is in [0.5, 2]; from bfloat16 w, w - 1 is exact.
      np.testing.assert_allclose(x, tensors[name], rtol=1e-7, atol=1e-7, err_msg=name)
    else:
      np.testing.assert_array_equal(x, tensors[name], err_msg=name)
  again, _ = load_on_mesh(save(str(tmp_path / "out"), dict(exported), 3_000), ignore=())
  for path, x in flat(again).items():
    assert x.sharding == targets[path]
    np.testing.assert_array_equal(np.asarray(x), np.asarray(got[path]), err_msg=path)


def test_bfloat16_params_without_mesh(tmp_path):
  tensors = hf_tensors()
  reader = save(str(tmp_path / "in"), tensors, 100_000)
  state = load_state(abstract("bfloat16"), None, RULES, reader, CFG, ignore=IGNORE)
  want = expected_state(tensors, BF16)
  for path, x in flat(state).items():
    assert x.dtype == want[path].dtype and len(x.sharding.device_set) == 1, path
    np.testing.assert_array_equal(np.asarray(x), want[path], err_msg=path)


class CountingReader:
  """A reader that logs its reads and checks, at each one, that no earlier whole tensor (as
  read, or as the q hook converted it) is still alive."""

  def __init__(self, reader):
    self.reader, self.directory = reader, reader.directory
    self.names, self.shape, self.dtype = reader.names, reader.shape, reader.dtype
    self.log, self.whole = [], []

  def _check(self):  # No gc.collect(): refcounting frees them unless something still holds them.
    alive = [r for r in self.whole + _hook_outputs if r() is not None]
    assert not alive, "an earlier whole HF tensor is still held"

  def read(self, name, dtype=None):
    self._check()
    x = self.reader.read(name, dtype)
    self.log.append((name, None))
    self.whole.append(weakref.ref(x))
    return x

  def read_slice(self, name, index, dtype=None):
    self._check()
    self.log.append((name, index))
    return self.reader.read_slice(name, index, dtype)


def test_one_tensor_at_a_time_and_blocks_where_possible(tmp_path):
  tensors = hf_tensors(BF16)
  reader = CountingReader(save(str(tmp_path / "in"), tensors, 5_000))
  _hook_outputs.clear()
  load_on_mesh(reader)
  whole = [name for name, index in reader.log if index is None]
  # The q hook needs whole tensors: each read once (not once per device), one per layer.
  assert sorted(whole) == [f"model.layers.{i}.attn.q_proj.weight" for i in range(L)]
  assert len(_hook_outputs) == L
  # Sharded parameters with block-for-block hooks read only their devices' blocks.
  for name in ["model.embed_tokens.weight", "model.layers.1.mlp.up_proj.weight",
               "model.extra.0.proj.weight"]:
    blocks = [index for n, index in reader.log if n == name]
    assert len(blocks) == 8, name  # one per device: (1, 4, 2) splits both axes
    for index in blocks:
      size = np.prod([s.stop - s.start for s in index])
      assert size * 8 == np.prod(tensors[name].shape), (name, index)
  assert [index for n, index in reader.log if n == "model.layers.1.mlp.up_proj.weight"][0] \
      == (slice(0, 24), slice(0, 8))  # HF's [out, in]: our "mlp" blocks are its rows


def _error(tmp_path, tensors, ignore=IGNORE):
  with pytest.raises(HFCheckpointError) as e:
    load_on_mesh(save(str(tmp_path / "bad"), tensors, 100_000), ignore=ignore)
  assert "\n" not in str(e.value)
  return str(e.value)


def test_missing_and_extra_tensors_are_listed_in_one_line(tmp_path):
  tensors = hf_tensors()
  del tensors["model.layers.1.mlp.up_proj.weight"], tensors["model.norm.weight"]
  tensors["model.layers.0.mlp.gate_proj.weight"] = np.zeros((M, D), np.float32)
  msg = _error(tmp_path, tensors, ignore=())
  assert re.fullmatch(
      r"load_state from .*/bad: 2 HF tensor\(s\) that no rule maps: lm_head\.weight, "
      r"model\.layers\.0\.mlp\.gate_proj\.weight; 2 of our parameter\(s\) that no HF tensor "
      r"fills: blocks\.up layer 1, final_norm\.scale", msg), msg


def test_tensor_beyond_the_model_is_an_error(tmp_path):
  tensors = hf_tensors()
  tensors[f"model.layers.{L}.norm.weight"] = np.ones(D, np.float32)
  assert _error(tmp_path, tensors) == (f"load_state: HF tensor model.layers.{L}.norm.weight "
                                       f"fills layer {L} of our blocks.norm.scale, which has "
                                       f"{L} layers")


@pytest.mark.parametrize("name,shape,message", [
    ("model.layers.2.mlp.up_proj.weight", (M, D + 1),
     f"HF tensor model.layers.2.mlp.up_proj.weight of shape ({M}, {D + 1}) becomes "
     f"({D + 1}, {M}) for our blocks.up layer 2, which has shape ({D}, {M})"),
    ("model.layers.0.attn.q_proj.weight", (N * H + 8, D),
     f"HF tensor model.layers.0.attn.q_proj.weight of shape ({N * H + 8}, {D}) becomes "
     f"({D}, {N}, {H + 2}) for our blocks.q layer 0, which has shape ({D}, {N}, {H})"),
    ("model.extra.1.proj.bias", (D - 1,),
     f"HF tensor model.extra.1.proj.bias of shape ({D - 1},) becomes ({D - 1},) for our "
     f"extra.1.b, which has shape ({D},)"),
])
def test_shape_mismatch_names_both_sides(tmp_path, name, shape, message):
  tensors = hf_tensors()
  tensors[name] = np.zeros(shape, np.float32)
  assert _error(tmp_path, tensors) == "load_state: " + message


def test_missing_shard_is_named(tmp_path):
  directory = tmp_path / "sharded"
  write_checkpoint(directory, hf_tensors().items(), max_shard_bytes=5_000)
  shard = sorted(f for f in os.listdir(directory) if f.startswith("model-"))[1]
  os.remove(directory / shard)
  with pytest.raises(HFCheckpointError, match=f"names shard {shard}, which is missing$"):
    CheckpointReader(directory)


def test_export_refuses_parameters_without_a_rule():
  state = abstract()  # refused before any parameter is fetched
  with pytest.raises(HFCheckpointError, match=r"^export_tensors: 2 of our parameter\(s\) that no "
                     r"rule maps: extra\.0\.b, extra\.1\.b$"):
    next(export_tensors(state, [r for r in RULES if not r.hf.endswith("bias")], CFG))
