"""Prompt template (REFERENCE §7) and Example → token ids, checked against hand-written text."""
import numpy as np
import pytest

from openvlthinker.data import prompts
from openvlthinker.data import tokenizer as tokenizer_lib
from openvlthinker.tasks.base import Example

IMG = np.zeros((4, 4, 3), np.uint8)
THINK = "Think inside <thinking> </thinking>, then give "


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.load_tokenizer()


def _example(**kw):
  base = dict(images=(IMG,), question="How many dots?", answer="3", problem_type="numerical",
              task_type="spatial_reasoning", uid="u1",
              reasoning="<thinking>1 2 3</thinking><answer>3</answer>")
  return Example(**{**base, **kw})


def test_prompt_text_by_problem_type():
  assert prompts.prompt_text(_example()) == (
      "<image>\nHow many dots?\n" + THINK + "the final answer inside <answer> </answer>.")
  mc = _example(problem_type="multiple choice", options=("A. red", "B. blue"),
                images=(IMG, IMG))
  assert prompts.prompt_text(mc) == (
      "<image>\n<image>\nHow many dots?\nA. red\nB. blue\n"
      + THINK + "the option letter alone inside <answer> </answer>.")
  box = _example(problem_type="spatial grounding", question="Where is the cat?")
  assert prompts.prompt_text(box) == (
      "<image>\nWhere is the cat?\n"
      + THINK + 'the box {"boxes": [x1, y1, x2, y2]} inside <answer> </answer>.')
  no_image = prompts.prompt_text(_example(images=()))
  assert no_image == "How many dots?\n" + prompts.DEFAULT_INSTRUCTION


def test_placeholders_in_the_question_are_used_in_place():
  ex = _example(question="Left <image> right <image>?", images=(IMG, IMG))
  assert prompts.prompt_text(ex).startswith("Left <image> right <image>?\n")
  with pytest.raises(ValueError, match=r"'u1'.*2 <image> placeholders.*1 images"):
    prompts.prompt_text(_example(question="Left <image> right <image>?"))


@pytest.mark.parametrize("num_images, num_image_tokens", [(1, 16), (2, 3), (0, 4)])
def test_encode_prompt_expands_image_runs(tok, num_images, num_image_tokens):
  ex = _example(images=(IMG,) * num_images, question="Q <image>?" if num_images == 1 else "Q?")
  ids = prompts.encode_prompt(ex, tok, num_image_tokens)
  assert ids.dtype == np.int32 and ids[0] == tok.bos_id
  is_image = np.concatenate([[False], ids == tok.image_id, [False]])
  starts = np.flatnonzero(~is_image[:-1] & is_image[1:])
  ends = np.flatnonzero(is_image[:-1] & ~is_image[1:])
  assert len(starts) == num_images and np.all(ends - starts == num_image_tokens)
  # The other ids are exactly the prompt text without its placeholders.
  text = prompts.prompt_text(ex).replace("<image>", "")
  assert tok.decode(ids[ids != tok.image_id]) == text


def test_encode_sft_masks_exactly_the_response_and_eos(tok):
  ex = _example(images=(IMG, IMG), question="Compare.")
  tokens, loss_mask = prompts.encode_sft(ex, tok, num_image_tokens=5)
  prompt = prompts.encode_prompt(ex, tok, 5)
  n = len(prompt)
  np.testing.assert_array_equal(tokens[:n], prompt)
  assert not loss_mask[:n].any() and loss_mask[n:].all()
  assert tokens[-1] == tok.eos_id and tok.eos_id not in tokens[:-1]
  assert tok.decode(tokens[n:]) == ex.reasoning


def test_encode_sft_needs_reasoning(tok):
  with pytest.raises(ValueError, match=r"'u1'.*reasoning is empty"):
    prompts.encode_sft(_example(reasoning=""), tok, 4)
