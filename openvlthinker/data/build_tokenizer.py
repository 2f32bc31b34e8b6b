"""Rebuilds the shipped tokenizer: `python -m openvlthinker.data.build_tokenizer`.

The corpus is the text the models read and write on the built-in suite: the prompt (question,
options, instruction) and the reasoning of `generate(task, 'train', i, difficulty)` for fixed
indices, every task and difficulty, plus each instruction. Training is deterministic, so running
this twice writes identical bytes. Prints one JSON line with the vocabulary and model sizes.
"""
from collections.abc import Iterator
import json
import os

from absl import app
from absl import flags

from openvlthinker import taxonomy
from openvlthinker.data import prompts
from openvlthinker.data import tokenizer as tokenizer_lib
from openvlthinker.tasks import answers
from openvlthinker.tasks import registry

_PER_TASK = flags.DEFINE_integer("per_task", 300, "Examples per task type and difficulty.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "Image size passed to the generators.")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", tokenizer_lib.MAX_VOCAB_SIZE, "Upper bound.")
_OUT = flags.DEFINE_string("out", None, "Output .model path (default: the shipped asset).")


def suite_texts(per_task: int, image_size: int = 64) -> Iterator[str]:
  """Prompt and reasoning text of `per_task` train examples per task and difficulty, in order."""
  yield from sorted(set(prompts.INSTRUCTIONS.values()) | {prompts.DEFAULT_INSTRUCTION})
  for task_type in taxonomy.TASK_TYPES:
    for difficulty in range(answers.MAX_DIFFICULTY + 1):
      for index in range(per_task):
        example = registry.generate(task_type, "train", index, difficulty=difficulty,
                                    image_size=image_size)
        yield prompts.prompt_text(example)
        yield example.reasoning


def main(argv):
  del argv
  out = _OUT.value or str(tokenizer_lib.default_model_path())
  proto = tokenizer_lib.train_sentencepiece(suite_texts(_PER_TASK.value, _IMAGE_SIZE.value),
                                            _VOCAB_SIZE.value)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "wb") as f:
    f.write(proto)
  tok = tokenizer_lib.SentencePieceTokenizer(proto)
  print(json.dumps({"out": out, "vocab_size": tok.vocab_size, "model_bytes": len(proto)}))


if __name__ == "__main__":
  app.run(main)
