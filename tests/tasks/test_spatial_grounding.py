"""spatial_grounding: the answer box equals the box of the named shape's pixels."""
import json
import re

import pytest

from openvlthinker.tasks import registry


@pytest.mark.parametrize("difficulty", [0, 1, 2, 3])
@pytest.mark.parametrize("image_size", [64, 96])
def test_box_is_the_named_shape_in_the_pixels(difficulty, image_size, read_blobs):
  for index in range(40):
    ex = registry.generate("spatial_grounding", "train", index, difficulty, image_size)
    color, kind = re.fullmatch(r"Where is the (\w+) (\w+)\?", ex.question).groups()
    blobs = read_blobs(ex.images[0])
    matches = [b for b in blobs if b.color == color and b.kind == kind]
    assert len(matches) == 1, (ex.uid, ex.question, blobs)  # the name is unambiguous
    assert json.loads(ex.answer) == {"boxes": list(matches[0].box)}, ex.uid
    assert len(blobs) == (2, 3, 4, 5)[difficulty]


def test_confusers_share_colour_and_kind_at_higher_difficulty(read_blobs):
  for index in range(30):
    ex = registry.generate("spatial_grounding", "train", index, difficulty=2)
    color, kind = re.fullmatch(r"Where is the (\w+) (\w+)\?", ex.question).groups()
    blobs = read_blobs(ex.images[0])
    assert any(b.color == color and b.kind != kind for b in blobs)
    assert any(b.kind == kind and b.color != color for b in blobs)
