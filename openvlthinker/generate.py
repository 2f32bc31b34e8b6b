"""Sample a checkpoint: `python -m openvlthinker.generate --checkpoint=DIR [--image=PATH ...]
--prompt=TEXT [--max_new_tokens=N] [--temperature=T] [--top_p=P] [--num_samples=K] [--json]`.

DIR is a Hugging Face checkpoint directory (Qwen2.5-VL, Qwen3-VL) or a run's workdir (its newest
checkpoint, or `--weights=rl:120`, as `eval.checkpoint` names them). For an HF checkpoint the
prompt is one user message (the images, then the text) rendered by its chat template with the
generation prompt, as `processor.apply_chat_template(..., add_generation_prompt=True)` does, and
each image is resized as its image processor does; a run uses its own prompt format and image
size. Temperature 0 is greedy. Prints the text of each sample, or with --json one JSON line per
sample: `prompt_token_ids`, `token_ids` (generated, up to and including the stop token) and `text`.
"""
from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
from absl import app, flags, logging
from flax import nnx
from PIL import Image

from openvlthinker.data import tokenizer as tokenizer_lib
from openvlthinker.errors import RunError
from openvlthinker.models.hf import chat_template, image_processor as improc, pretrained
from openvlthinker.models.hf.tokenizer import HFTokenizer
from openvlthinker.sampler import Sampler, SamplerConfig

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "An HF checkpoint directory or a workdir.")
_IMAGE = flags.DEFINE_multi_string("image", [], "Image files, in order (repeat the flag).")
_PROMPT = flags.DEFINE_string("prompt", None, "The user's text.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 128, "Most tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 = greedy.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling threshold (1 = off).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Samples of the prompt.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_WEIGHTS = flags.DEFINE_string("weights", "", "Workdir only: which checkpoint (eval.checkpoint).")
_JSON = flags.DEFINE_bool("json", False, "One JSON line per sample instead of the text.")


def _load_images(paths):
  images = []
  for path in paths:
    try:
      with Image.open(path) as im:
        images.append(im.convert("RGB") if im.mode != "RGB" else im.copy())
    except OSError as e:
      raise ValueError(f"--image {path}: cannot read the image ({e})") from None
  return images


def canvas(images) -> np.ndarray | None:
  """uint8[1, N, Hmax, Wmax, 3] with image k in the top-left corner of slot k (the layout of
  `models.qwen_vl`), or None without images."""
  if not images:
    return None
  out = np.zeros((1, len(images), max(x.shape[0] for x in images),
                  max(x.shape[1] for x in images), 3), np.uint8)
  for k, x in enumerate(images):
    out[0, k, :x.shape[0], :x.shape[1]] = x
  return out


def from_hf_dir(directory: str, text: str, images):
  """(model, tokenizer, prompt ids int32[L], images uint8[1, N, H, W, 3] or None)."""
  image_cfg = improc.ImageProcessorConfig.from_json(directory)
  resized = [improc.resize(im, image_cfg) for im in images]
  sizes = tuple(x.shape[:2] for x in resized)
  if len(set(sizes)) <= 1:  # one entry serves every slot
    sizes = sizes[:1] or ((image_cfg.factor, image_cfg.factor),)
  cfg = pretrained.model_config(directory, image_sizes=sizes)
  tok = HFTokenizer.from_dir(directory)
  grids = [improc.grid(x.shape[0], x.shape[1], image_cfg) for x in resized]
  ids = chat_template.encode_chat(tok, chat_template.load_template(directory), text, grids,
                                  image_cfg)
  return pretrained.build(cfg, directory=directory), tok, ids, canvas(resized)


def from_workdir(workdir: str, text: str, images, weights: str):
  """The same from a run's workdir: its config, newest (or named) weights and prompt format."""
  from openvlthinker.data import prompts  # pylint: disable=g-import-not-at-top
  from openvlthinker.train import context, weights as weights_lib  # pylint: disable=g-import-not-at-top
  ctx = context.build_context(context.load_run_config(workdir), workdir)
  chosen = weights_lib.select(ctx, weights)
  print(f"generate: {chosen.describe()}", file=sys.stderr)
  size = ctx.config.model.vision.image_size
  arrays = [np.asarray(im.resize((size, size), Image.BICUBIC)) for im in images]
  tokens = ctx.model.tokens_per_image(size, size) if arrays else 0
  ids = prompts.encode_text((prompts.IMAGE + "\n") * len(arrays) + text, ctx.tokenizer, tokens)
  model = nnx.merge(ctx.graphdef, chosen.params)
  return model, ctx.tokenizer, ids, np.stack(arrays)[None] if arrays else None


def generate(model, tok, ids, images, *, max_new_tokens, temperature, top_p, num_samples,
             seed) -> list[dict]:
  """Samples `num_samples` responses; [{prompt_token_ids, token_ids, text}] per sample."""
  ids = np.asarray(ids, np.int32)
  bucket = 1 << max(6, int(len(ids) - 1).bit_length())
  config = SamplerConfig(max_new_tokens=max_new_tokens, greedy=temperature == 0,
                         temperature=temperature or 1.0, top_p=top_p,
                         prompt_buckets=(bucket,), **tokenizer_lib.sampler_ids(tok))
  out = Sampler(model, config)(nnx.state(model), ids[None], np.ones((1, len(ids)), bool),
                               images, jax.random.key(seed), group_size=num_samples)
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  return [{"prompt_token_ids": ids.tolist(), "token_ids": tokens[k, :lengths[k]].tolist(),
           "text": tok.decode(tokens[k, :lengths[k]].tolist())} for k in range(num_samples)]


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs each restore at INFO
  if not _CHECKPOINT.value or _PROMPT.value is None:
    print("error: --checkpoint and --prompt are required", file=sys.stderr)
    sys.exit(2)
  try:
    images = _load_images(_IMAGE.value)
    directory = _CHECKPOINT.value
    if os.path.isfile(os.path.join(directory, "config.json")) and \
        os.path.isfile(os.path.join(directory, "preprocessor_config.json")):
      model, tok, ids, pixels = from_hf_dir(directory, _PROMPT.value, images)
    else:
      model, tok, ids, pixels = from_workdir(directory, _PROMPT.value, images, _WEIGHTS.value)
    samples = generate(model, tok, ids, pixels, max_new_tokens=_MAX_NEW_TOKENS.value,
                       temperature=_TEMPERATURE.value, top_p=_TOP_P.value,
                       num_samples=_NUM_SAMPLES.value, seed=_SEED.value)
  except (ValueError, OSError, RunError) as e:
    print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
    sys.exit(2)
  for sample in samples:
    print(json.dumps(sample) if _JSON.value else sample["text"])


if __name__ == "__main__":
  app.run(main)
