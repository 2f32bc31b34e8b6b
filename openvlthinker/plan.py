"""The memory and shape plan of a config (#8): per device, the parameters, AdamW state and gradients
as the rule table shards them, the rollout's KV cache at `rl.sampler.max_new_tokens`, the rest of
the rollout's and the update's temporaries, and whether the peak fits a chip. Nothing is
allocated: the model is abstract (`nnx.eval_shape`); the trainer's own update and sampler are
compiled on (fake CPU) devices with `--compile` (their `memory_analysis()`), else estimated from
shapes and shardings.

  python -m openvlthinker.plan --config=configs/tpu_pod.py:v5p-64 [--chip=v5p-64] [--devices=N]
      [--compile]
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from openvlthinker import configuration, sharding
from openvlthinker import sampler as sampler_lib
from openvlthinker.models import decoder as decoder_lib
from openvlthinker.models import registry
from openvlthinker.models.hf import pretrained
from openvlthinker.plan_data import GB, Chip, parse_chip, planned_config
from openvlthinker.train.batch import RolloutBatch
from openvlthinker.train.context import Context
from openvlthinker.train.rl_stage import RLStage
from openvlthinker.train.state import TrainState

# The executable of a plan never runs: LLVM's optimisations change no buffer and take most of
# XLA:CPU's compile time (the test config's update: 29 s → 9 s, same memory_analysis()).
_PLAN_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

# ------------------------------------------------------------------------------ configs


def load_config(spec: str):
  """(ConfigDict, arg or None) of 'configs/x.py[:arg]', as --config reads it."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return (module.get_config(arg) if arg else module.get_config()), arg or None


def mesh_sizes(config, devices: int | None) -> dict[str, int]:
  """The (data, fsdp, tensor) sizes of `config.mesh` on `devices` (required when one is -1)."""
  sizes = {a: config.mesh[a] for a in sharding.MESH_AXES}
  known = math.prod(s for s in sizes.values() if s != -1)
  if -1 in sizes.values():
    if devices is None:
      raise ValueError(f"--devices: mesh {sizes} fills the devices (-1): give --devices=N or a "
                       "slice, --chip=v5p-64")
    if devices % known:
      raise ValueError(f"--devices: {devices} is not a multiple of the fixed mesh axes ({known})")
    return {a: devices // known if s == -1 else s for a, s in sizes.items()}
  if devices is not None and devices != known:
    raise ValueError(f"--devices: mesh {sizes} uses {known} devices, not {devices}")
  return sizes


# ------------------------------------------------------------------------------ abstract pieces


def abstract_model(config, sharder: sharding.Sharder):
  """(the model of `config.model` with abstract parameters, its family's config)."""
  m = config.model
  if m.name == "vlm":
    from openvlthinker.models.build import vlm_config  # pylint: disable=g-import-not-at-top
    from openvlthinker.models.vlm import VLM  # pylint: disable=g-import-not-at-top
    cfg, cls = vlm_config(m), VLM
  elif m.name in pretrained.FAMILIES:
    from openvlthinker.models.qwen_vl import QwenVL  # pylint: disable=g-import-not-at-top
    size = m.vision.image_size
    cfg = pretrained.model_config(pretrained.checkpoint_dir(m)[0], image_sizes=((size, size),),
                                  dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat,
                                  scan_layers=m.scan_layers)
    cls = QwenVL
  else:
    raise ValueError(f"model.name: the plan knows vlm and {pretrained.FAMILIES}, got {m.name!r}")
  with _quiet_tracer_errors():
    return nnx.eval_shape(lambda: cls(cfg, sharder, rngs=nnx.Rngs(config.seed))), cfg


@contextlib.contextmanager
def _quiet_tracer_errors():
  """flax's Variable.set_value probes `.sharding` of every rng count it sets, which on a tracer
  raises an AttributeError that getattr's default swallows; JAX words that message by walking
  the whole trace so far, quadratic in the model: 8 of 9 s of tracing Qwen3-VL-8B. Unworded here."""
  from jax._src.interpreters import partial_eval as pe  # pylint: disable=g-import-not-at-top
  original = pe.DynamicJaxprTracer._origin_msg  # pylint: disable=protected-access
  pe.DynamicJaxprTracer._origin_msg = lambda self: ""  # pylint: disable=protected-access
  try:
    yield
  finally:
    pe.DynamicJaxprTracer._origin_msg = original  # pylint: disable=protected-access


def rl_stage(config, sharder: sharding.Sharder):
  """(the trainer's RLStage over the abstract model of `config`, the model, its config): the
  optimizer, state shardings, jitted update and sampler a run of `config` compiles."""
  model, cfg = abstract_model(config, sharder)
  graphdef, params = nnx.split(model)
  info = registry.FamilyInfo(vocab_size=cfg.text.vocab_size, image_token_id=cfg.image_token_id,
                             has_vision=getattr(cfg, "vision", None) is not None, config=cfg)
  # No tokenizer: the sampler's stop and pad ids change no shape.
  ctx = Context(config=config, workdir="", sharder=sharder, model=model, model_info=info,
                graphdef=graphdef, initial_params=params, tokenizer=None)
  return RLStage(ctx, metrics_writer=None), model, cfg


def device_bytes(tree) -> int:
  """Bytes one device holds of a tree of placed abstract arrays."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def abstract_state(stage: RLStage) -> TrainState:
  """The RL train state (parameters, AdamW moments and counters, shaping statistics) as placed
  abstract arrays, on the shardings the stage's update pins."""
  params, scalar = stage.ctx.initial_params, jax.ShapeDtypeStruct((), jnp.int32)
  state = TrainState(step=scalar, params=params, opt_state=jax.eval_shape(stage.tx.init, params),
                     skipped=scalar, extra=jax.eval_shape(stage.reward.init_stats))

  def put(s, x):  # parameters are nnx Variables of abstract arrays
    placed = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    return x.replace(placed) if isinstance(x, nnx.Variable) else placed
  return jax.tree.map(put, stage.state_shardings, state,
                      is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))


def _batch(sharder, shape, dtype):
  return jax.ShapeDtypeStruct(shape, dtype,
                              sharding=sharding.batch_sharding(sharder, len(shape), shape))


def update_batch(stage: RLStage, model) -> RolloutBatch:
  """The placed abstract minibatch of B = stage.rows rows at the widest shapes the update compiles
  (sequence [B, Lb + Lr], responses [B, Lr]): the largest prompt bucket Lb and untrimmed
  responses (every row ran to Lr = max_new_tokens)."""
  c, shd, rows = stage.c, stage.ctx.sharder, stage.rows
  lb, lr = max(c.data.prompt_buckets), c.rl.sampler.max_new_tokens
  graphdef, params = nnx.split(model)

  def positions(params, tokens, mask):  # the family's position pytree over prompt + response
    m = nnx.merge(graphdef, params)
    prompt, start = m.prompt_positions(tokens, mask)
    return jax.tree.map(lambda a, r: jnp.concatenate([a, r], axis=1), prompt,
                        m.response_positions(start, lr))

  sds = jax.ShapeDtypeStruct
  pos = jax.eval_shape(positions, params, sds((rows, lb), jnp.int32), sds((rows, lb), bool))
  size, n = c.model.vision.image_size, c.data.max_images
  full, resp, row, f32, i32 = (rows, lb + lr), (rows, lr), (rows,), jnp.float32, jnp.int32
  batch = RolloutBatch(
      sequence_tokens=sds(full, i32), sequence_positions=pos, sequence_mask=sds(full, bool),
      prefix_mask=sds(full, bool), tokens=sds(resp, i32), old_logprobs=sds(resp, f32),
      entropies=sds(resp, f32), response_mask=sds(resp, bool), lengths=sds(row, i32),
      images=sds((rows, n, size, size, 3), jnp.uint8) if stage.ctx.uses_images else None,
      task_ids=sds(row, i32), task_keys=sds(row, i32), reward=sds(row, f32),
      accuracy=sds(row, f32), format=sds(row, f32), structure=sds(row, f32),
      length_reward=sds(row, f32), advantages=sds(row, f32), valid=sds(row, bool),
      ref_logprobs=sds(resp, f32) if stage.loss_config.kl_coef > 0 else None, response_start=lb)
  return jax.tree.map(lambda x: _batch(shd, x.shape, x.dtype), batch)


def rollout_inputs(stage: RLStage) -> tuple:
  """Placed abstract inputs of one rollout of P = rl.prompts_per_step prompts in the largest
  bucket Lb: tokens int32[P, Lb], mask bool[P, Lb], images uint8[P, N, H, W, 3] or None, ids
  int32[P], a key."""
  c, shd = stage.c, stage.ctx.sharder
  p, lb, size = c.rl.prompts_per_step, max(c.data.prompt_buckets), c.model.vision.image_size
  images = (_batch(shd, (p, c.data.max_images, size, size, 3), jnp.uint8)
            if stage.ctx.uses_images else None)
  key = jax.eval_shape(lambda: jax.random.key(0))
  return (_batch(shd, (p, lb), jnp.int32), _batch(shd, (p, lb), bool), images,
          _batch(shd, (p,), jnp.int32),
          jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=shd.replicated()))

# ------------------------------------------------------------------------------ estimates


def _split(sharder, name: str, n: int) -> int:
  """Per-device size of a dimension of n on logical axis `name` (the rule table's split)."""
  return n // sharder.shards(name, n)


def _layer(text, shd, rows: int, length: int, keys: int, dt: int, backward: bool) -> float:
  """One decoder layer's intermediates (bytes, one device) on `rows` local rows of `length`
  queries over `keys` keys. Attention is dense (layers.attend): float32 logits and their exp,
  [rows, heads, length, keys], dominate a long sequence. Forward only, fused elementwise ops keep
  fewer of the projections and MLP activations alive."""
  n, k = _split(shd, "act_heads", text.num_heads), _split(shd, "act_kv_heads", text.num_kv_heads)
  f = _split(shd, "act_mlp", text.mlp_dim)
  if backward:
    per_token = 6 * text.width + 2 * (n + 2 * k) * text.head_dim + 3 * f
  else:
    per_token = 2 * text.width + (n + 2 * k) * text.head_dim + 2 * f
  return rows * (n * length * keys * (4 + dt) + length * dt * per_token)


def _tables(text) -> float:
  """Bytes of the embedding and head tables gathered whole where they are used (the lookup
  replicates its table; FSDP gathers the head), in the parameter and the compute dtype."""
  size = text.vocab_size * text.width * (1 if text.tie_embeddings else 2)
  return size * (jnp.dtype(text.param_dtype).itemsize + jnp.dtype(text.dtype).itemsize)


def _vision(cfg, shd, images: int, size: int, dt: int):
  """(one vision layer's intermediates, its residual stream, depth, remat) on one device, for
  `images` images of the batch (rows of the tower, split like batch rows)."""
  v = cfg.vision
  if hasattr(v, "num_patches"):  # the built-in ViT
    t, d, depth, heads, mlp, remat = (v.num_patches, v.width, v.num_layers, v.num_heads,
                                      v.mlp_dim, False)
  else:  # the Qwen towers: patches before the 2×2 merge
    t, d, depth, heads, mlp = ((size // v.patch_size) ** 2, v.hidden_size, v.depth, v.num_heads,
                               v.intermediate_size)
    remat = getattr(v, "remat", False)
  rows, n = _split(shd, "batch", images), _split(shd, "act_heads", heads)
  layer = rows * (n * t * t * (4 + dt) + t * dt * (8 * d + 2 * _split(shd, "act_mlp", mlp)))
  return layer, rows * t * d * dt, depth, remat


def estimate_update(stage: RLStage, cfg, grads: float, batch: float) -> float:
  """The update's temporaries beyond its gradient accumulator (bytes, one device) for one
  micro-batch: what the backward pass keeps of the forward, one layer's backward, the float32
  response logits (log-softmax, entropy, their gradient), the whole embedding and head tables,
  the vision tower, the micro-batch's own gradient before it is added, and the minibatch."""
  c, shd, text = stage.c, stage.ctx.sharder, cfg.text
  dt = jnp.dtype(text.dtype).itemsize
  lb, lr = max(c.data.prompt_buckets), c.rl.sampler.max_new_tokens
  m, g = c.rl.micro_batch_size, (c.rl.group_size if c.rl.share_prompt_forward else 1)
  rows, prompts = _split(shd, "batch", m), _split(shd, "batch", m // g)
  # Shared prompt forward: each prompt runs once and its cache (with gradient) is the prefix of
  # its G responses, which run over it. Otherwise every row runs prompt + response.
  passes = [(prompts, lb, lb), (rows, lr, lb + lr)] if g > 1 else [(rows, lb + lr, lb + lr)]
  layers = [_layer(text, shd, *p, dt, backward=True) for p in passes]
  if text.remat:  # the residual stream per layer; one layer recomputed, with its gradient
    act = text.num_layers * sum(b * l * text.width * dt for b, l, _ in passes) + 2 * max(layers)
  else:
    act = text.num_layers * sum(layers) + max(layers)
  if g > 1:
    kv = _split(shd, "act_kv_heads", text.num_kv_heads)
    act += 2 * 2 * text.num_layers * prompts * kv * lb * text.head_dim * dt
  act += rows * lr * _split(shd, "act_vocab", text.vocab_size) * 4 * 4
  act += _tables(text) + text.vocab_size * text.width * 4  # and the head's whole gradient
  if getattr(cfg, "vision", None) is not None:
    one, stream, depth, remat = _vision(cfg, shd, m // g * c.data.max_images,
                                        c.model.vision.image_size, dt)
    act += depth * stream + 2 * one if remat else (depth + 1) * one
  return act + grads + batch


def kv_cache(stage: RLStage, cfg) -> float:
  """Bytes per device of the rollout's KV cache at its peak: each prompt's cache (stored once for
  its G samples) and the samples' own Lr - 1 slots as the last decode phase grows them
  (`grow_cache` pads into new buffers while the previous phase's are alive)."""
  c, shd = stage.c, stage.ctx.sharder
  p, lb, lr = c.rl.prompts_per_step, max(c.data.prompt_buckets), c.rl.sampler.max_new_tokens
  axes = {5: decoder_lib.CACHE_KV_AXES, 4: decoder_lib.CACHE_KV_AXES[1:],
          2: decoder_lib.CACHE_VALID_AXES}

  def local(rows, slots):  # both families' caches are the shared decoder's
    cache = jax.eval_shape(lambda: decoder_lib.init_cache(cfg.text, rows, slots))
    return sum(math.prod(shd.sharding(axes[x.ndim], x.shape).shard_shape(x.shape))
               * x.dtype.itemsize for x in jax.tree.leaves(cache) if x.ndim in axes)
  ends = sampler_lib.decode_phase_ends(lr, c.rl.sampler.decode_phases)
  return local(p, lb) + sum(local(p * c.rl.group_size, max(e - 1, 1)) for e in ends[-2:])


def estimate_rollout(stage: RLStage, cfg, inputs: float) -> float:
  """The rollout's bytes per device besides the KV cache: its inputs, the whole embedding and
  head tables, the prefill (the prompts' cache, one layer's and one vision layer's forward) and
  the decode steps' float32 logits of every row and response buffers."""
  c, shd, text = stage.c, stage.ctx.sharder, cfg.text
  dt = jnp.dtype(text.dtype).itemsize
  lb, lr = max(c.data.prompt_buckets), c.rl.sampler.max_new_tokens
  p = _split(shd, "batch", c.rl.prompts_per_step)
  b = _split(shd, "batch", c.rl.prompts_per_step * c.rl.group_size)
  n = _split(shd, "act_kv_heads", text.num_kv_heads)
  prefill = (2 * text.num_layers * p * n * lb * text.head_dim * dt
             + _layer(text, shd, p, lb, lb, dt, backward=False))
  if getattr(cfg, "vision", None) is not None:
    prefill += _vision(cfg, shd, c.rl.prompts_per_step * c.data.max_images,
                       c.model.vision.image_size, dt)[0]
  # Per row: its logits (and sampling's copies) and tokens, log-probs, entropies, sequence.
  decode = b * (_split(shd, "act_vocab", text.vocab_size) * 4 * 4 + 2 * (lb + lr) * 16)
  # Summed, not the larger: XLA may make the decode's cache before the prefill is done (on
  # XLA:CPU qwen2_5_vl:3b's rollout needs the cache and the prefill at once).
  return inputs + _tables(text) + prefill + decode

# ------------------------------------------------------------------------------ the plan

ROWS = (("params", "parameters"), ("adam", "AdamW state"), ("grads", "gradients"),
        ("kv_cache", "rollout KV cache"), ("rollout_other", "rollout: other temporaries"),
        ("update_act", "update activations"))


@dataclasses.dataclass
class Plan:
  """Bytes per device of `config` on `devices` devices; `method` tells how the temporaries were
  found ("compiled (...)" or "estimated")."""
  config: str
  devices: int
  mesh: dict[str, int]
  method: str
  parameters: int            # the parameter count
  bytes: dict[str, float]    # ROWS' keys, and "counters" (step, shaping statistics; replicated)
  shapes: dict[str, Any]     # rows per device, lengths, compiled sizes: for the reader
  # The compiled update and sampler when compiled (their HLO holds the per-device layouts).
  executables: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

  @property
  def rollout(self) -> float:
    return self.bytes["kv_cache"] + self.bytes["rollout_other"]

  @property
  def update(self) -> float:
    return self.bytes["grads"] + self.bytes["update_act"]

  @property
  def total(self) -> float:
    """The peak: the train state lives throughout; the rollout's buffers are freed before the
    update makes its own."""
    b = self.bytes
    return b["params"] + b["adam"] + b["counters"] + max(self.rollout, self.update)

  def fits(self, chip: Chip) -> bool:
    return self.total <= chip.hbm_gb * GB


def _sharder(config, sizes: dict[str, int], concrete: bool) -> sharding.Sharder:
  """The rule table on a mesh of the first devices (to compile), or on an abstract mesh."""
  n = math.prod(sizes.values())
  if concrete and jax.device_count() < n:
    raise ValueError(f"--compile: the mesh needs {n} devices, jax has {jax.device_count()} "
                     "(`python -m openvlthinker.plan` fakes them on CPU)")
  mesh = (sharding.make_mesh(sizes, devices=jax.devices()[:n]) if concrete else
          jax.sharding.AbstractMesh(tuple(sizes.values()), tuple(sizes)))
  return sharding.Sharder(mesh, tuple((k, v if isinstance(v, str) or v is None else tuple(v))
                                      for k, v in config.sharding_rules))


def make_plan(config, arg: str | None = None, devices: int | None = None, compile: bool = False,
              name: str = "") -> Plan:
  """The plan of `config` (`arg`: its preset, which names a published HF architecture) on
  `devices` devices. compile=True compiles the update and the sampler on the first `devices` jax
  devices and reads their memory_analysis(); otherwise their temporaries are estimated."""
  with planned_config(config, arg) as c:
    configuration.validate(c, mode="eval")  # the batch arithmetic; reads no training data
    sizes = mesh_sizes(c, devices)
    n = math.prod(sizes.values())
    stage, model, cfg = rl_stage(c, _sharder(c, sizes, compile))
    state, batch, inputs = abstract_state(stage), update_batch(stage, model), rollout_inputs(stage)
    b = {"params": device_bytes(state.params), "adam": device_bytes(state.opt_state),
         "counters": device_bytes((state.step, state.skipped, state.extra)),
         "kv_cache": kv_cache(stage, cfg)}
    b["grads"] = b["params"]  # the accumulator: the parameters' shapes, dtype and layout
    r, shapes, executables = c.rl, {}, {}
    if compile:
      executables["update"] = stage.update.lower(state, batch).compile(_PLAN_COMPILE)
      update = executables["update"].memory_analysis()
      # Its arguments (state, minibatch) and temporaries (the gradient accumulator among them);
      # the outputs alias the donated state.
      b["update_act"] = update.temp_size_in_bytes - b["grads"] + device_bytes(batch)
      # The sampler's jitted generation on abstract inputs (Sampler.lower wants host arrays).
      executables["rollout"] = sampler_lib._generate.lower(  # pylint: disable=protected-access
          state.params, *inputs, **stage.sampler._static(r.group_size)  # pylint: disable=protected-access
      ).compile(_PLAN_COMPILE)
      rollout = executables["rollout"].memory_analysis()
      # Its temporaries hold the KV cache; "other" is the rest (0 when the cache, counted at the
      # growth's peak, is the larger).
      b["rollout_other"] = max(0, rollout.temp_size_in_bytes + rollout.output_size_in_bytes
                               + device_bytes(inputs) - b["kv_cache"])
      method = f"compiled (XLA:{jax.devices()[0].platform.upper()}, {n} devices)"
      shapes = {"update_temp": update.temp_size_in_bytes,
                "update_arguments": update.argument_size_in_bytes,
                "rollout_temp": rollout.temp_size_in_bytes,
                "rollout_arguments": rollout.argument_size_in_bytes}
    else:
      b["update_act"] = estimate_update(stage, cfg, b["grads"], device_bytes(batch))
      b["rollout_other"] = estimate_rollout(stage, cfg, device_bytes(inputs))
      method = "estimated"
    split = lambda n: _split(stage.ctx.sharder, "batch", n)
    shapes.update(rollout_rows=split(r.prompts_per_step * r.group_size),
                  micro_batch_rows=split(r.micro_batch_size), batch_bytes=device_bytes(batch),
                  prompt_tokens=max(c.data.prompt_buckets), response_tokens=r.sampler.max_new_tokens)
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))
  return Plan(config=name, devices=n, mesh=sizes, method=method,
              parameters=count, bytes=b, shapes=shapes, executables=executables)

# ------------------------------------------------------------------------------ report, CLI


def verdict(plan: Plan, chip: Chip) -> str:
  total = plan.total / GB
  total = f"{total:.1f}" if total >= 1 else f"{total:.2g}"
  if plan.fits(chip):
    return f"fits {chip}: yes, {total} GB of {chip.hbm_gb:g}"
  return (f"does NOT fit {chip}: {total} GB of {chip.hbm_gb:g}: reduce rl.prompts_per_step or "
          "rl.micro_batch_size, or add chips")


def report(plan: Plan, chip: Chip) -> str:
  """A markdown table (GB per device), one JSON line, and the verdict line."""
  gb = {k: v / GB for k, v in plan.bytes.items()}
  lines = [f"{plan.config}: {plan.parameters / 1e9:.2f} B parameters on {plan.devices} devices, "
           f"mesh {plan.mesh}, temporaries {plan.method}", "", "| per device | GB |", "|---|---|"]
  lines += [f"| {label} | {gb[key]:.3g} |" for key, label in ROWS]
  lines += [f"| **total** (peak: parameters + AdamW + the larger of rollout and update) | "
            f"**{plan.total / GB:.3g}** |", ""]
  lines.append(json.dumps(dict(
      config=plan.config, devices=plan.devices, mesh=plan.mesh, method=plan.method,
      parameters=plan.parameters, **{f"{k}_gb": round(v, 6) for k, v in gb.items()},
      total_gb=round(plan.total / GB, 6), chip=chip.name, chip_gb=chip.hbm_gb,
      fits=plan.fits(chip), **plan.shapes)))
  return "\n".join(lines + [verdict(plan, chip)])


def main(argv=None) -> int:
  """Prints the report; exits 1 when the config does not fit the chip, 2 on a bad argument."""
  parser = argparse.ArgumentParser(prog="python -m openvlthinker.plan",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True, help="configs/x.py[:arg]")
  parser.add_argument("--chip", help="v4 | v5e | v5p | v6e, or a slice (v5p-64: its chips set "
                      "--devices); default: the preset's name if a slice, else v5p")
  parser.add_argument("--devices", type=int, help="default: the config's mesh")
  parser.add_argument("--compile", action="store_true", help="compile the update and sampler on "
                      "fake CPU devices (XLA:CPU computes bfloat16 in float32: an upper bound)")
  args = parser.parse_args(argv)
  try:
    config, arg = load_config(args.config)
    named = arg if arg and re.fullmatch(r"v\w+-\d+", arg) else None
    chip = parse_chip(args.chip or named or "v5p")
    devices = args.devices or chip.devices
    if args.compile and devices and "xla_force_host_platform_device_count" not in os.environ.get(
        "XLA_FLAGS", ""):  # read when the backend starts, which nothing has started yet
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                 f" --xla_force_host_platform_device_count={devices}")
    plan = make_plan(config, arg, devices, compile=args.compile, name=args.config)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(report(plan, chip))
  return 0 if plan.fits(chip) else 1


if __name__ == "__main__":
  sys.exit(main())
