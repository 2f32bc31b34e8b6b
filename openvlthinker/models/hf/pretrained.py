"""A Qwen-VL model from a Hugging Face checkpoint directory, each parameter created directly in
its sharding on the mesh (no full copy on one device, one checkpoint tensor on the host at a
time), and the `qwen2_5_vl` / `qwen3_vl` model families of `config.model.name`.

A directory holds config.json, `*.safetensors` (optionally sharded with an index), the image
processor config and the tokenizer files. `config.model.init=hf:DIR` loads its weights;
`config.model.hf_dir=DIR` alone takes only the architecture, tokenizer and image processing
(random weights: a tiny preset for tests, or a run restored from its own checkpoints).
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable

import jax
import ml_collections
from flax import nnx

from openvlthinker.fields import FieldError
from openvlthinker.models import registry
from openvlthinker.models.hf import convert, qwen_vl as hf_qwen_vl
from openvlthinker.models.hf import image_processor as improc
from openvlthinker.models.hf.tokenizer import HFTokenizer
from openvlthinker.models.hf.safetensors_io import CheckpointReader, HFCheckpointError
from openvlthinker.models.qwen_vl import QwenVL, QwenVLConfig
from openvlthinker.sharding import Sharder, state_shardings

WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")
HF_PREFIX = "hf:"  # model.init=hf:DIR
FAMILIES = tuple(hf_qwen_vl.MODEL_TYPES)


class _Renamed:
  """A checkpoint reader whose tensor names pass through `rename` (legacy layouts)."""

  def __init__(self, reader: CheckpointReader, rename: Callable[[str], str]):
    self._reader = reader
    self._original = {rename(n): n for n in reader.names()}

  def names(self) -> list[str]:
    return sorted(self._original)

  def shape(self, name):
    return self._reader.shape(self._original[name])

  def dtype(self, name):
    return self._reader.dtype(self._original[name])

  def read(self, name, dtype=None):
    return self._reader.read(self._original[name], dtype=dtype)

  def read_slice(self, name, index, dtype=None):
    return self._reader.read_slice(self._original[name], index, dtype=dtype)


def copy_side_files(source: str, destination: str) -> None:
  """Copies a checkpoint directory's files other than its weights (config, tokenizer, image
  processor, chat template, generation config) into `destination`."""
  os.makedirs(destination, exist_ok=True)
  for name in sorted(os.listdir(source)):
    path = os.path.join(source, name)
    if os.path.isfile(path) and not name.endswith(WEIGHT_SUFFIXES):
      shutil.copyfile(path, os.path.join(destination, name))


def read_config(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, "config.json")
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise HFCheckpointError(f"HF checkpoint {directory}: cannot read config.json ({e})") from None


def model_config(directory: str, *, image_sizes=((448, 448),), dtype="float32",
                 param_dtype="float32", remat=False, scan_layers=True) -> QwenVLConfig:
  """Our config of the checkpoint in `directory` (its config.json and image processor)."""
  return hf_qwen_vl.config_from_hf(
      read_config(directory), improc.ImageProcessorConfig.from_json(directory),
      image_sizes=image_sizes, dtype=dtype, param_dtype=param_dtype, remat=remat,
      scan_layers=scan_layers)


def build(cfg: QwenVLConfig, sharder: Sharder = Sharder(), *, directory: str | None = None,
          seed: int = 0) -> QwenVL:
  """The model of `cfg` with the weights of the checkpoint in `directory`, or random ones."""
  abstract = nnx.eval_shape(lambda: QwenVL(cfg, sharder, rngs=nnx.Rngs(seed)))
  graphdef, abstract_state = nnx.split(abstract)
  shardings = None if sharder.mesh is None else state_shardings(abstract_state, sharder)
  if directory is None:
    init = lambda: nnx.state(QwenVL(cfg, sharder, rngs=nnx.Rngs(seed)))
    state = jax.jit(init, out_shardings=shardings)() if shardings is not None else init()
  else:
    reader = _Renamed(CheckpointReader(directory), hf_qwen_vl.canonical_name)
    state = convert.load_state(abstract_state, shardings, hf_qwen_vl.rules(cfg), reader, cfg,
                               ignore=hf_qwen_vl.ignored(cfg))
  return nnx.merge(graphdef, state)


def checkpoint_dir(model: ml_collections.ConfigDict) -> tuple[str, bool]:
  """(the HF directory of `config.model`, whether its weights are loaded): model.hf_dir, else
  model.init's hf:DIR."""
  init = model.get("init", "")
  load = init.startswith(HF_PREFIX)
  directory = model.get("hf_dir", "") or (init[len(HF_PREFIX):] if load else "")
  if not directory:
    raise FieldError("model.hf_dir", f"a Hugging Face checkpoint directory for "
                     f"model.name={model.name} (or model.init=hf:DIR)", "")
  return directory, load


def _family(name: str):
  def build_family(model: ml_collections.ConfigDict, sharder: Sharder, seed: int):
    directory, load = checkpoint_dir(model)
    size = model.vision.image_size
    cfg = model_config(directory, image_sizes=((size, size),), dtype=model.dtype,
                       param_dtype=model.param_dtype, remat=model.remat,
                       scan_layers=model.scan_layers)
    if cfg.family != name:
      raise ValueError(f"model.name: {name} but {directory}/config.json is a {cfg.family}")
    return build(cfg, sharder, directory=directory if load else None, seed=seed), \
        registry.FamilyInfo(vocab_size=cfg.text.vocab_size, image_token_id=cfg.image_token_id,
                            has_vision=True, config=cfg, tokenizer=HFTokenizer.from_dir(directory))
  return build_family


for _name in FAMILIES:
  registry.register_family(_name)(_family(_name))
