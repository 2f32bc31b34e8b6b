"""A Hugging Face checkpoint through the whole trainer, as a user runs it: import (model.init=
hf:DIR), 3 RL steps on public-format JSON data on the 8 devices (a JSON evaluation set before
and after), export, and transformers loads
the export and computes our logits."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "tools"))
import tiny_qwen_vl  # noqa: E402  pylint: disable=g-import-not-at-top

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
# (problem type, task type, question, options, answer of record k)
KINDS = (("numerical", "chart_figure_qa", "<image> How many bars are in the chart?", [],
          lambda k: str(k % 5)),
         ("multiple choice", "general_vqa", "<image> What color is the image?",
          ["A. red", "B. blue", "C. green", "D. gray"], lambda k: "ABCD"[k % 4]),
         ("spatial grounding", "spatial_grounding", "<image> Box the square.", [],
          lambda k: '{"boxes": [10, 20, 30, 40]}'),
         ("ocr", "ocr", "<image> Read the text in the image.", [], lambda k: "hello"))


def write_json_set(directory, n=24):
  """A public-format JSON file of n records over four task types, images of several sizes."""
  os.makedirs(os.path.join(directory, "imgs"))
  rng = np.random.default_rng(0)
  records = []
  for k in range(n):
    problem_type, task_type, question, options, answer = KINDS[k % len(KINDS)]
    h, w = ((40, 70), (80, 50), (64, 64))[k % 3]
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
        os.path.join(directory, "imgs", f"{k}.png"))
    records.append({"problem_id": k, "problem": question, "data_type": "image",
                    "problem_type": problem_type, "options": options,
                    "answer": f"<answer>{answer(k)}</answer>", "images": [f"imgs/{k}.png"],
                    "task_type": task_type})
  path = os.path.join(directory, "data.json")
  with open(path, "w") as f:
    json.dump(records, f)
  return path


def test_import_rl_export_and_transformers_loads_it(tmp_path, cli_env):
  source = str(tmp_path / "hf")
  net, tok, processor = tiny_qwen_vl.write("qwen2_5_vl", source)
  data = write_json_set(str(tmp_path / "data"))
  held = write_json_set(str(tmp_path / "held"), n=6)
  workdir, out = str(tmp_path / "run"), str(tmp_path / "export")
  absent = [f"--config.data.mixture.{t}=0" for t in ("math_reasoning", "spatial_reasoning")]
  run = subprocess.run(
      [sys.executable, "-m", "openvlthinker.main", "--config=configs/qwen2_5_vl.py:tiny",
       f"--config.model.init=hf:{source}", f"--config.data.path={data}", *absent,
       "--config.rl.steps=3", "--config.eval.every=100", "--config.eval.suite=False",
       f"--config.eval.sets=held:{held}",
       f"--workdir={workdir}", "--mode=rl"], cwd=ROOT, env=cli_env, capture_output=True,
      text=True, timeout=900, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "rl: starting from the model.init weights" in run.stdout
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rl = [r for r in map(json.loads, f) if r["stage"] == "rl" and "policy_loss" in r]
  assert [r["step"] for r in rl] == [1, 2, 3]
  # The JSON evaluation set, before and after RL, through the checkpoint's chat template.
  for step in (0, 3):
    with open(os.path.join(workdir, "eval", f"rl_{step}", "summary.json")) as f:
      summary = json.load(f)
    assert summary["weights"] == {"stage": "rl", "step": step}
    assert summary["sets"]["held"]["problems"] == 6
  assert os.path.getsize(os.path.join(workdir, "eval", "accuracy_over_steps.png")) > 0
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    evals = [r for r in map(json.loads, f) if r["stage"] == "eval"]
  assert [r["step"] for r in evals] == [0, 3] and all("set_mean@1/held" in r for r in evals)
  # The update's teacher-forced log-probs (images, M-RoPE positions, shared prompt forward) are
  # the sampler's: every importance ratio of the first minibatch is 1.
  for r in rl:
    assert abs(r["ratio_max"] - 1) < 1e-3 and abs(r["ratio_min"] - 1) < 1e-3, r

  export = subprocess.run(
      [sys.executable, "-m", "openvlthinker.models.hf.export", f"--workdir={workdir}",
       f"--out={out}", "--max_shard_size_mb=1"], cwd=ROOT, env=cli_env, capture_output=True,
      text=True, timeout=600, check=False)
  assert export.returncode == 0, export.stderr[-3000:]
  assert "exported rl step 3" in export.stdout

  loaded = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
      out, attn_implementation="eager").eval()
  before = dict(net.named_parameters())
  with torch.no_grad():
    moved = max(float((p - before[n]).abs().max()) for n, p in loaded.named_parameters())
  assert moved > 1e-6  # the exported weights are the run's (RL's weight decay moved them)

  # Ours: the run's RL weights on the run's mesh-free rebuild, on an image of its 56x56 size.
  from flax import nnx
  from openvlthinker.train import context, weights
  ctx = context.build_context(context.load_run_config(workdir), workdir)
  model = nnx.merge(ctx.graphdef, weights.select(ctx, "rl").params)
  image = np.random.default_rng(5).integers(0, 256, (56, 56, 3), dtype=np.uint8)
  pixels = processor(images=[image], return_tensors="pt")
  pad = tok.convert_tokens_to_ids("<|image_pad|>")
  ids = ([tok.convert_tokens_to_ids("<|vision_start|>")] + [pad] * 4 +
         [tok.convert_tokens_to_ids("<|vision_end|>")] + tok.encode("Read the text."))
  t = torch.tensor([ids])
  with torch.no_grad():
    ref = loaded(input_ids=t, mm_token_type_ids=(t == pad).long(), **pixels).logits.numpy()
  tokens = jnp.asarray([ids], jnp.int32)
  positions, _ = model.prompt_positions(tokens, jnp.ones(tokens.shape, bool))
  ours, _ = jax.jit(lambda s, x, p, i: nnx.merge(ctx.graphdef, s)(x, p, i))(
      nnx.state(model), tokens, positions, jnp.asarray(image[None, None]))
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)

  # `generate` on the run's workdir: its recorded config, newest weights and prompt format (by
  # hand on this run it also gave the export's tokens for the same image and prompt).
  Image.fromarray(image).save(tmp_path / "image.png")
  gen = subprocess.run(
      [sys.executable, "-m", "openvlthinker.generate", f"--checkpoint={workdir}",
       f"--image={tmp_path / 'image.png'}", "--prompt=Read the text.", "--max_new_tokens=8",
       "--json"], cwd=ROOT, env=cli_env, capture_output=True, text=True, timeout=600,
      check=False)
  assert gen.returncode == 0, gen.stderr[-3000:]
  assert "generate: rl step 3" in gen.stderr
  said = json.loads(gen.stdout.strip().splitlines()[-1])
  assert pad in said["prompt_token_ids"] and len(said["token_ids"]) == 8
