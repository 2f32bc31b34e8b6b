"""The prompt template (REFERENCE §7) and the tokenisation of an `Example` into model inputs.

Prompt text: `<image>` and a newline per image before the question unless the question already
carries `<image>` placeholders, then the question, then the options one per line (multiple
choice), then a short fixed instruction for the problem type. Token sequences are `[bos] prompt`
for RL and `[bos] prompt response [eos]` for SFT; each `<image>` id becomes `num_image_tokens`
copies of itself. A checkpoint's tokenizer with a chat template (a Hugging Face family) gets
the prompt as one user turn rendered by that template with the generation prompt (the images, in
the order of their placeholders, between the text parts) and no bos; its eos ends the turn.
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


def chat_turn(text: str) -> list[dict]:
  """One user message whose content is `text` split at its `<image>` placeholders into text
  parts and images (the content-list form Qwen-VL chat templates read)."""
  content = []
  for k, part in enumerate(text.split(IMAGE)):
    if k:
      content.append({"type": "image"})
    part = part.strip("\n") if k else part.rstrip("\n")
    if part:
      content.append({"type": "text", "text": part})
  return [{"role": "user", "content": content}]


def encode_text(text: str, tokenizer: tokenizer_lib.Tokenizer, num_image_tokens: int
                ) -> np.ndarray:
  """int32[Lp]: prompt `text` (`<image>` placeholders included) as model input: `[bos] text`,
  or its chat-template rendering, with image placeholders expanded."""
  template = getattr(tokenizer, "chat_template", None)
  if template:
    from openvlthinker.models.hf import chat_template  # pylint: disable=g-import-not-at-top
    rendered = chat_template.render(template, chat_turn(text), add_generation_prompt=True,
                                    **getattr(tokenizer, "special_tokens_map", {}))
    ids = tokenizer.encode(rendered)
  else:  # a checkpoint tokenizer may have no bos
    ids = [tokenizer.bos_id] * (tokenizer.bos_id is not None) + tokenizer.encode(text)
  return expand_image_tokens(ids, tokenizer.image_id, num_image_tokens)


def encode_prompt(example: Example, tokenizer: tokenizer_lib.Tokenizer,
                  num_image_tokens: int) -> np.ndarray:
  """int32[Lp]: the prompt of `example` as model input (`encode_text`)."""
  return encode_text(prompt_text(example), tokenizer, num_image_tokens)


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
