"""`python -m openvlthinker.generate --json` on a tiny checkpoint written by `save_pretrained`
gives transformers' greedy `generate` tokens for the same message (its chat template, its image
processor on the raw image)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "tools"))
import tiny_qwen_vl  # noqa: E402  pylint: disable=g-import-not-at-top

PROMPT = "How many red circles are in the image?"


def hf_prompt(tok, processor, image):
  """transformers' prompt ids and pixel inputs: apply_chat_template, then each <|image_pad|>
  repeated grid.prod() // merge² times, as Qwen2_5_VLProcessor.__call__ expands it."""
  messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
  text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
  pixels = processor(images=[image], return_tensors="pt")
  n = int(pixels["image_grid_thw"][0].prod()) // processor.merge_size ** 2
  text = text.replace("<|image_pad|>", "<|image_pad|>" * n)  # one image
  ids = tok(text, add_special_tokens=False)["input_ids"]
  return ids, pixels


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_generate_json_equals_transformers_greedy(family, tmp_path, cli_env):
  directory = str(tmp_path / "ckpt")
  net, tok, processor = tiny_qwen_vl.write(family, directory)
  # Not a multiple of 28 or 32: both sides resize it (smart_resize, bicubic).
  image = np.random.default_rng(0).integers(0, 256, (61, 90, 3), dtype=np.uint8)
  Image.fromarray(image).save(tmp_path / "image.png")
  out = subprocess.run(
      [sys.executable, "-m", "openvlthinker.generate", f"--checkpoint={directory}",
       f"--image={tmp_path / 'image.png'}", f"--prompt={PROMPT}", "--max_new_tokens=20",
       "--json"], capture_output=True, text=True, env=cli_env, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  (line,) = out.stdout.strip().splitlines()
  ours = json.loads(line)
  ids, pixels = hf_prompt(tok, processor, image)
  assert ours["prompt_token_ids"] == ids
  t = torch.tensor([ids])
  with torch.no_grad():
    ref = net.generate(input_ids=t, attention_mask=torch.ones_like(t),
                       mm_token_type_ids=(t == tok.convert_tokens_to_ids("<|image_pad|>")).long(),
                       pixel_values=pixels["pixel_values"],
                       image_grid_thw=pixels["image_grid_thw"], max_new_tokens=20,
                       do_sample=False)
  ref = ref[0, len(ids):].tolist()
  eos = tok.convert_tokens_to_ids("<|im_end|>")
  if eos in ref:  # transformers pads after the stop token; ours ends with it
    ref = ref[:ref.index(eos) + 1]
  assert ours["token_ids"] == ref
  assert ours["text"] == tok.decode(ref, skip_special_tokens=True)
