"""Small public-format JSON evaluation sets written by the tests: every problem type, and a set
with bad records (a missing image, an undecodable one, an unknown problem type)."""
import json
import os

import numpy as np
from PIL import Image

# (task_type, problem_type, problem, answer, options) of each kind of record.
KINDS = (
    ("general_vqa", "multiple choice", "<image> What colour is the square?", "A",
     ["A. red", "B. blue", "C. green"]),
    ("spatial_reasoning", "numerical", "<image> How many squares are there?", "3", []),
    ("spatial_reasoning", "regression", "<image> How wide is the square, in cm?", "2.5", []),
    ("ocr", "ocr", "<image> Read the text.", "hello world", []),
    ("math_reasoning", "math", "<image> What is half of the shaded area?", "\\frac{1}{2}", []),
    ("spatial_grounding", "spatial grounding", "<image> Where is the square?", "[8, 8, 40, 40]",
     []),
    ("chart_figure_qa", "open-ended", "<image> Describe the chart.", "a red bar", []),
)


def _image(path, seed):
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)


def write_set(directory, name, per_kind=2, bad=False):
  """DIR/NAME.jsonl with per_kind records of every kind (images in DIR/NAME_images/); with bad,
  three more records that cannot be evaluated. Returns the file's path."""
  images = os.path.join(directory, f"{name}_images")
  os.makedirs(images, exist_ok=True)
  records = []
  for k, (task, ptype, problem, answer, options) in enumerate(KINDS):
    for j in range(per_kind):
      uid = f"{name}-{k}-{j}"
      _image(os.path.join(images, f"{uid}.png"), seed=10 * k + j)
      records.append({"problem_id": uid, "problem": problem, "problem_type": ptype,
                      "task_type": task, "answer": f"<answer>{answer}</answer>",
                      "options": options, "images": [f"{name}_images/{uid}.png"]})
  if bad:
    good = dict(records[0])
    with open(os.path.join(images, "undecodable.png"), "wb") as f:
      f.write(np.random.default_rng(1).bytes(200))
    records += [dict(good, problem_id="missing", images=[f"{name}_images/nowhere.png"]),
                dict(good, problem_id="undecodable", images=[f"{name}_images/undecodable.png"]),
                dict(good, problem_id="unknown-type", problem_type="haiku")]
  path = os.path.join(directory, f"{name}.jsonl")
  with open(path, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  return path
