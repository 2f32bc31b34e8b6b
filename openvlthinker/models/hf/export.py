"""Writes a run's trained policy as a Hugging Face checkpoint that transformers and vLLM load:
`python -m openvlthinker.models.hf.export --workdir=RUN --out=DIR [--checkpoint=rl:120]
[--dtype=bfloat16] [--max_shard_size_mb=4096]`.

The run must be of a Hugging Face family (it started from `model.init=hf:DIR` or
`model.hf_dir`); its workdir keeps a copy of that checkpoint's config, tokenizer, image processor
and chat template (`WORKDIR/hf`, written when the run started), which go next to the weights.
`--checkpoint` names the weights as `eval.checkpoint` does ('' = the newest of the latest stage).
Parameters are fetched to the host one at a time and streamed into safetensors shards with an
index; on several processes every process runs this and process 0 writes.
"""
from __future__ import annotations

import collections
import os
import sys

import jax
from absl import app, flags, logging

from openvlthinker.errors import RunError
from openvlthinker.models.hf import convert, pretrained, qwen_vl as hf_qwen_vl
from openvlthinker.models.hf.safetensors_io import write_checkpoint

_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir.")
_OUT = flags.DEFINE_string("out", None, "The directory to write (must not exist).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "", "Which weights (as eval.checkpoint).")
_DTYPE = flags.DEFINE_enum("dtype", "", ["", "float32", "bfloat16"],
                           "Tensor dtype ('' = the source checkpoint's config.json dtype).")
_MAX_SHARD_MB = flags.DEFINE_integer("max_shard_size_mb", 4096, "Largest shard, in MiB.")


def export(workdir: str, out: str, checkpoint: str = "", dtype: str = "",
           max_shard_bytes: int = 4 << 30) -> str:
  """Writes `out`; returns a one-line account of what was exported."""
  from openvlthinker.train import context, weights as weights_lib  # pylint: disable=g-import-not-at-top
  config = context.load_run_config(workdir)
  if config.model.name not in pretrained.FAMILIES:
    raise ValueError(f"model.name: {workdir} is a run of {config.model.name!r}; only "
                     f"{', '.join(pretrained.FAMILIES)} runs export to Hugging Face")
  side_files = os.path.join(workdir, context.HF_FILES)
  if not os.path.isfile(os.path.join(side_files, "config.json")):
    raise ValueError(f"{side_files}: expected the run's copy of its HF checkpoint's files")
  # The architecture from the run's copy; the weights come from its checkpoints (random ones
  # are never exported).
  with config.unlocked():
    config.model.hf_dir, config.model.init = side_files, ""
  ctx = context.build_context(config, workdir)
  chosen = weights_lib.select(ctx, checkpoint)
  if chosen.is_random:
    raise ValueError(f"--checkpoint: {workdir} has no saved weights to export")
  cfg = ctx.model_info.config
  source = pretrained.read_config(side_files)
  dtype = dtype or {"bfloat16": "bfloat16"}.get(source.get("dtype") or
                                                source.get("torch_dtype"), "float32")
  tensors = ((hf_qwen_vl.published_name(name), x) for name, x in
             convert.export_tensors(chosen.params, hf_qwen_vl.rules(cfg), cfg, dtype=dtype))
  if jax.process_index() == 0:
    write_checkpoint(out, tensors, max_shard_bytes=max_shard_bytes)
    pretrained.copy_side_files(side_files, out)
  else:
    collections.deque(tensors, maxlen=0)  # the other processes take part in each gather
  return f"exported {chosen.describe()} as {dtype} to {out}"


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs each restore at INFO
  if not _WORKDIR.value or not _OUT.value:
    print("error: --workdir and --out are required", file=sys.stderr)
    sys.exit(2)
  try:
    print(export(_WORKDIR.value, _OUT.value, _CHECKPOINT.value, _DTYPE.value,
                 _MAX_SHARD_MB.value << 20))
  except (ValueError, OSError, RunError) as e:
    print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
