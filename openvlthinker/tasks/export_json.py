"""Writes problems of the procedural suite as a public-format JSONL file with PNG images, the
format `data.source=json` and `eval.sets` read (the OpenVLThinkerV2 release's records).

  python -m openvlthinker.tasks.export_json --out DIR [--split eval] [--per_task 32]
      [--difficulty 0] [--image_size 64] [--tasks ocr,general_vqa]

writes DIR/suite_<split>.jsonl and DIR/images/<problem_id>.png: the first `per_task` problems of
each task type, so a set exported twice is the same set.
"""
from __future__ import annotations

import argparse
import json
import os
import re
from typing import Sequence

from PIL import Image

from openvlthinker import taxonomy
from openvlthinker.data.sources import SuiteTaskSource
from openvlthinker.tasks.base import Example

_IMAGE = "<image>"


def to_record(example: Example, image_paths: Sequence[str]) -> dict:
  """The public-format record of an example whose images are saved at image_paths (relative
  to the file's image root)."""
  question = example.question
  if _IMAGE not in question:  # the suite's questions leave the placeholders to the prompt builder
    question = f"{_IMAGE}\n" * len(image_paths) + question  # as `data.prompts` lays them out
  return {"problem_id": example.uid, "problem": question, "problem_type": example.problem_type,
          "task_type": example.task_type, "options": list(example.options),
          "answer": f"<answer>{example.answer}</answer>", "images": list(image_paths),
          "reasoning": example.reasoning, "data_type": "image", "data_source": "openvlthinker-suite"}


def export(out: str, split: str = "eval", per_task: int = 32, difficulty: int = 0,
           image_size: int = 64, tasks: Sequence[str] = taxonomy.TASK_TYPES) -> str:
  """Writes the set; returns the JSONL file's path."""
  os.makedirs(os.path.join(out, "images"), exist_ok=True)
  path = os.path.join(out, f"suite_{split}.jsonl")
  with open(path + ".tmp", "w") as f:
    for task in tasks:
      source = SuiteTaskSource(task, split, difficulty, image_size)
      for i in range(per_task):
        example = source[i]
        names = []
        for j, image in enumerate(example.images):
          name = f"images/{re.sub(r'[^A-Za-z0-9_.-]', '_', example.uid)}_{j}.png"
          Image.fromarray(image).save(os.path.join(out, name))
          names.append(name)
        f.write(json.dumps(to_record(example, names)) + "\n")
  os.replace(path + ".tmp", path)
  return path


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--split", default="eval")
  parser.add_argument("--per_task", type=int, default=32)
  parser.add_argument("--difficulty", type=int, default=0)
  parser.add_argument("--image_size", type=int, default=64)
  parser.add_argument("--tasks", default=",".join(taxonomy.TASK_TYPES))
  a = parser.parse_args(argv)
  tasks = [taxonomy.canonical_task_type(t) for t in a.tasks.split(",") if t]
  print(export(a.out, a.split, a.per_task, a.difficulty, a.image_size, tasks))


if __name__ == "__main__":
  main()
