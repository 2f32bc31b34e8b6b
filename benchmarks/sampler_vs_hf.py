"""Our JAX sampler against transformers' `generate` on the same tiny Qwen2.5-VL weights, same run.

Prints one JSON line. The checkpoint is `tools/tiny_qwen_vl.py`'s (2 decoder layers, width 64,
2-block vision tower), written to a temporary directory with transformers' `save_pretrained` and
loaded into our model through `openvlthinker.models.hf.pretrained`. Workload: 8 prompts × 8
samples, 64 new tokens, one random 56x84 image per prompt (6 image tokens) and a different
question each, in Qwen's chat layout, so prompt lengths differ a little; temperature 1, no top-k /
top-p, no stop token (every row generates all 64 tokens on both sides).

Ours: `Sampler(...)(state, tokens, mask, uint8 images, key, group_size=8)`; prompts right-aligned
in one 64-slot bucket, each prompt prefilled once and shared by its 8 samples. One warm-up call
(`compile_s`: its wall time, trace + compile + one run), then --repeats timed calls. A timed call
includes the host → device transfer of the numpy prompts and uint8 images, the image
preprocessing (normalise + patchify run inside the jitted call), the vision tower, prefill, decode
and the device → host copy of the tokens (`np.asarray(out.tokens)`).

HF: torch on CPU, `torch.set_num_threads(2)`, eager attention, float32, the 8 prompts batched with
left padding and an attention mask, `generate(do_sample=True, temperature=1, top_k=0, top_p=1,
num_return_sequences=8, max_new_tokens=64, min_new_tokens=64)`, generation_config.eos_token_id =
None. It gets preprocessed tensors (input_ids, attention_mask, mm_token_type_ids, pixel_values,
image_grid_thw built once, outside the timings): its image preprocessing and tokenisation are
not timed, its vision tower, 64-row prefill (generate expands each prompt to its 8 samples before
the prefill) and decode are. One warm-up call, then --repeats timed calls.

Both take turns in each round (ours, then HF) so drifting load hits both; figures are medians with
the (min, max) spread. `greedy_match`: a separate untimed greedy call (64 tokens, one prompt,
unpadded on HF's side) gives the same tokens on both sides; `greedy_match_batch`: the same for
all 8 prompts batched (HF left-padded), so the timed computations are known to be equal ones.
The 1-minute load average before and after is recorded (other processes share the cores).

  python benchmarks/sampler_vs_hf.py [--repeats=N] [--dir=DIR]
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

import tiny_qwen_vl  # noqa: E402
from openvlthinker.models.hf import pretrained  # noqa: E402
from openvlthinker.sampler import Sampler, SamplerConfig  # noqa: E402

PROMPTS, GROUP, NEW_TOKENS = 8, 8, 64
IMAGE_SIZE = (56, 84)  # (H, W): multiples of patch 14 × merge 2, so HF's resize is the identity
BUCKET = 64
QUESTIONS = (
    "How many red circles are in the image?",
    "What is 12 + 30?",
    "Read the text in the image.",
    "Which option is correct? A B C D E.",
    "Think inside <thinking> </thinking>, then give the final answer.",
    "Which bar is the largest?",
    "What is the smallest value in the chart?",
    "Give the box {\"boxes\": [10, 20, 30, 40]} of the line.",
)


class Workload:
  """The tiny checkpoint, transformers' model of it and both sides' inputs for the 8 prompts."""

  def __init__(self, directory):
    self.net, self.tok, self.processor = tiny_qwen_vl.write("qwen2_5_vl", directory)
    self.net.generation_config.eos_token_id = None  # every row runs to its length
    cfg = pretrained.model_config(directory, image_sizes=(IMAGE_SIZE,))
    self.model = pretrained.build(cfg, directory=directory)
    ids = self.tok.convert_tokens_to_ids
    self.image_pad = ids("<|image_pad|>")
    self.pad_id = self.tok.pad_token_id
    rng = np.random.default_rng(0)
    self.images = [rng.integers(0, 256, IMAGE_SIZE + (3,), dtype=np.uint8) for _ in QUESTIONS]
    out = self.processor(images=self.images, return_tensors="pt")
    self.pixel_values, self.grid = out["pixel_values"], out["image_grid_thw"]
    # Qwen's chat layout, the image's pads expanded as the processor counts them.
    n = int(np.prod(self.grid[0].tolist())) // 4
    enc = self.tok.encode
    self.ids = [[ids("<|im_start|>")] + enc("user\n") + [ids("<|vision_start|>")]
                + [self.image_pad] * n + [ids("<|vision_end|>")] + enc(q)
                + [ids("<|im_end|>")] + enc("\n") + [ids("<|im_start|>")] + enc("assistant\n")
                for q in QUESTIONS]

  def ours_inputs(self, rows):
    """Right-padded numpy prompts (the sampler aligns them) and uint8[P, 1, H, W, 3] images."""
    width = max(len(self.ids[i]) for i in rows)
    tokens = np.full((len(rows), width), self.pad_id, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for r, i in enumerate(rows):
      tokens[r, :len(self.ids[i])], mask[r, :len(self.ids[i])] = self.ids[i], True
    return tokens, mask, np.stack([self.images[i] for i in rows])[:, None]

  def hf_inputs(self, rows):
    """Left-padded torch inputs of `rows` for `generate`, images preprocessed."""
    width = max(len(self.ids[i]) for i in rows)
    ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, i in enumerate(rows):
      ids[r, width - len(self.ids[i]):] = torch.tensor(self.ids[i])
      mask[r, width - len(self.ids[i]):] = 1
    patches = self.pixel_values.shape[0] // len(QUESTIONS)  # equal sizes: equal patch counts
    pixels = torch.cat([self.pixel_values[i * patches:(i + 1) * patches] for i in rows])
    return dict(input_ids=ids, attention_mask=mask,
                mm_token_type_ids=(ids == self.image_pad).long(), pixel_values=pixels,
                image_grid_thw=self.grid[list(rows)])

  def sampler(self, greedy):
    config = SamplerConfig(max_new_tokens=NEW_TOKENS, temperature=1.0, greedy=greedy,
                           stop_tokens=(), pad_id=self.pad_id, prompt_buckets=(BUCKET,))
    return Sampler(self.model, config)

  def ours(self, rows, *, greedy=False, group=GROUP, seed=0):
    """A function: one sampler call on `rows`, returning the tokens as numpy int32[P·G, Lr]."""
    sampler, state = self.sampler(greedy), nnx.state(self.model)
    tokens, mask, images = self.ours_inputs(rows)
    key = jax.random.key(seed)
    return lambda: np.asarray(sampler(state, tokens, mask, images, key, group_size=group).tokens)

  def hf(self, rows, *, greedy=False, group=GROUP):
    """A function: one `generate` call on `rows`, returning the new tokens int64[P·G, Lr]."""
    inputs = self.hf_inputs(rows)
    sample = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=1.0, top_k=0,
                                                       top_p=1.0)

    def run():
      with torch.no_grad():
        out = self.net.generate(**inputs, num_return_sequences=group, max_new_tokens=NEW_TOKENS,
                                min_new_tokens=NEW_TOKENS, pad_token_id=self.pad_id, **sample)
      return out[:, inputs["input_ids"].shape[1]:].numpy()
    return run


def timed(fns, repeats):
  """Per function: (median, min, max) wall seconds over `repeats` rounds calling each once in
  turn; the functions were warmed up before."""
  times = [[] for _ in fns]
  for _ in range(repeats):
    for i, fn in enumerate(fns):
      start = time.perf_counter()
      fn()
      times[i].append(time.perf_counter() - start)
  return [(statistics.median(t), min(t), max(t)) for t in times]


def greedy_matches(w, rows):
  ours = w.ours(rows, greedy=True, group=1)()
  ref = w.hf(rows, greedy=True, group=1)()
  return ours.shape == ref.shape and bool((ours == ref).all())


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dir", default="", help="where to write the tiny checkpoint (default: a "
                      "temporary directory)")
  args = parser.parse_args()
  torch.set_num_threads(2)
  load_before = os.getloadavg()[0]
  with tempfile.TemporaryDirectory() as tmp:
    w = Workload(args.dir or tmp)
  rows = tuple(range(PROMPTS))
  greedy_one, greedy_batch = greedy_matches(w, (0,)), greedy_matches(w, rows)

  ours, hf = w.ours(rows), w.hf(rows)
  start = time.perf_counter()
  first = ours()
  compile_s = time.perf_counter() - start
  hf_first = hf()
  assert first.shape == hf_first.shape == (PROMPTS * GROUP, NEW_TOKENS), (first.shape,
                                                                          hf_first.shape)
  (med, lo, hi), (h_med, h_lo, h_hi) = timed([ours, hf], args.repeats)
  generated = PROMPTS * GROUP * NEW_TOKENS
  lengths = sorted(len(x) for x in w.ids)
  out = dict(
      tokens_per_s=round(generated / med, 1), hf_tokens_per_s=round(generated / h_med, 1),
      speedup_vs_hf=round(h_med / med, 2), median_s=round(med, 4), hf_median_s=round(h_med, 4),
      range_s=[round(lo, 4), round(hi, 4)], hf_range_s=[round(h_lo, 4), round(h_hi, 4)],
      compile_s=round(compile_s, 2), runs=args.repeats, greedy_match=greedy_one,
      greedy_match_batch=greedy_batch,
      batch=f"{PROMPTS} prompts x {GROUP} samples", new_tokens=NEW_TOKENS,
      image_size=list(IMAGE_SIZE), prompt_tokens=[lengths[0], lengths[-1]], prompt_bucket=BUCKET,
      model="tiny qwen2_5_vl (tools/tiny_qwen_vl.py: 2 layers, width 64, vocab "
            f"{w.model.cfg.text.vocab_size}), float32",
      jax=jax.__version__, torch=torch.__version__, transformers=transformers.__version__,
      backend=jax.default_backend(), torch_threads=torch.get_num_threads(),
      machine=dict(platform=platform.platform(), processor=platform.processor() or
                   platform.machine(), cpus=os.cpu_count(),
                   cpus_usable=len(os.sched_getaffinity(0))),
      load_avg_1min=[round(load_before, 2), round(os.getloadavg()[0], 2)],
      xla_flags=os.environ.get("XLA_FLAGS", ""))
  print(json.dumps(out))


if __name__ == "__main__":
  main()
