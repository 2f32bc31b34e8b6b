"""ocr: the answer is exactly what PIL was asked to draw, and the text is visible in the image."""
import numpy as np
import pytest

from openvlthinker.tasks import registry


@pytest.mark.parametrize("difficulty", [0, 1, 2, 3])
def test_answer_is_the_drawn_text(difficulty, drawn_text, sample_directly):
  for seed in range(50):
    drawn_text.clear()
    ex = sample_directly("ocr", seed, difficulty)
    assert drawn_text == ex.answer.split(), (seed, drawn_text, ex.answer)
    assert all(w.isalpha() and w.islower() for w in drawn_text)


def test_word_counts_by_difficulty():
  for difficulty, allowed in ((0, {1}), (1, {1, 2}), (2, {2, 3}), (3, {3})):
    seen = {len(registry.generate("ocr", "train", i, difficulty).answer.split())
            for i in range(40)}
    assert seen == allowed, (difficulty, seen)


def test_difficulty_zero_is_clean_dark_text_inside_the_frame():
  for index in range(30):
    image = registry.generate("ocr", "train", index, 0).images[0].astype(int)
    assert set(np.unique(image[..., 0] - image[..., 2])) == {0}  # grey levels only
    ink = image.min(-1) < 128
    assert ink.sum() > 60  # a large word
    ys, xs = ink.nonzero()
    assert xs.min() > 0 and ys.min() > 0 and xs.max() < 63 and ys.max() < 63


def test_noise_and_rotation_grow_with_difficulty():
  def stats(difficulty):
    metas = [registry.generate("ocr", "train", i, difficulty).meta for i in range(20)]
    return max(abs(m["angle"]) for m in metas), max(m["noise"] for m in metas)

  assert stats(0) == (0.0, 0.0)
  angles, noise = zip(*(stats(d) for d in range(4)))
  assert list(angles) == sorted(angles) and list(noise) == sorted(noise) and noise[3] > 0
