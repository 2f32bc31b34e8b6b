"""The prompt template (REFERENCE §7) and the tokenisation of an `Example` into model inputs.

Prompt text: `<image>` and a newline per image before the question unless the question already
carries `<image>` placeholders, then the question, then the options one per line (multiple
choice), then a short fixed instruction for the problem type. Token sequences are `[bos] prompt`
for RL and `[bos] prompt response [eos]` for SFT; each `<image>` id becomes `num_image_tokens`
copies of itself.
"""
import numpy as np

from openvlthinker.data import tokenizer as tokenizer_lib
from openvlthinker.tasks.base import Example

IMAGE = tokenizer_lib.IMAGE

# Kept short on purpose: the CPU demo model reads the instruction at every step.
_THINK = "Think inside <thinking> </thinking>, then give "
INSTRUCTIONS = {
    "multiple choice": _THINK + "the option letter alone inside <answer> </answer>.",
    "spatial grounding": _THINK + 'the box {"boxes": [x1, y1, x2, y2]} inside <answer> </answer>.',
}
DEFAULT_INSTRUCTION = _THINK + "the final answer inside <answer> </answer>."


def instruction(problem_type: str) -> str:
  return INSTRUCTIONS.get(problem_type, DEFAULT_INSTRUCTION)


def prompt_text(example: Example) -> str:
  """The prompt of `example` as text, `<image>` placeholders included (one per image).

  Raises ValueError (naming the uid) when the question's placeholders do not match the images.
  """
  num_placeholders = example.question.count(IMAGE)
  if num_placeholders and num_placeholders != len(example.images):
    raise ValueError(f"example {example.uid!r}: question has {num_placeholders} {IMAGE} "
                     f"placeholders but there are {len(example.images)} images")
  # A newline after each image keeps the image-token runs of adjacent images apart.
  prefix = "" if num_placeholders else (IMAGE + "\n") * len(example.images)
  parts = [prefix + example.question]
  parts.extend(example.options)
  parts.append(instruction(example.problem_type))
  return "\n".join(parts)


def expand_image_tokens(ids, image_id: int, num_image_tokens: int) -> np.ndarray:
  """int32[L'] with every `image_id` of int[L] repeated `num_image_tokens` times."""
  ids = np.asarray(ids, np.int32)
  return np.repeat(ids, np.where(ids == image_id, num_image_tokens, 1))


def encode_prompt(example: Example, tokenizer: tokenizer_lib.Tokenizer,
                  num_image_tokens: int) -> np.ndarray:
  """int32[Lp]: `[bos] prompt` with image placeholders expanded."""
  ids = [tokenizer.bos_id] + tokenizer.encode(prompt_text(example))
  return expand_image_tokens(ids, tokenizer.image_id, num_image_tokens)


def encode_sft(example: Example, tokenizer: tokenizer_lib.Tokenizer,
               num_image_tokens: int) -> tuple[np.ndarray, np.ndarray]:
  """`[bos] prompt response [eos]` as (tokens int32[L], loss_mask bool[L]).

  The response is `example.reasoning`; loss_mask is True exactly at the positions holding response
  tokens and the final eos (target positions: the trainer predicts tokens[t] from position t - 1).
  Raises ValueError when the example has no reasoning to train on.
  """
  if not example.reasoning:
    raise ValueError(f"example {example.uid!r}: reasoning is empty, nothing to train on")
  prompt = encode_prompt(example, tokenizer, num_image_tokens)
  response = np.asarray(tokenizer.encode(example.reasoning) + [tokenizer.eos_id], np.int32)
  tokens = np.concatenate([prompt, response])
  loss_mask = np.arange(len(tokens)) >= len(prompt)
  return tokens, loss_mask
