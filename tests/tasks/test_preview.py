"""The contact sheet: one row per task type, each sample's image pasted at the zoom asked."""
import numpy as np
from PIL import Image

from openvlthinker import taxonomy
from openvlthinker.tasks import preview, registry


def test_main_writes_a_sheet_with_every_sample(tmp_path):
  out = tmp_path / "sheet.png"
  preview.main(["--out", str(out), "--per_task", "2", "--zoom", "2"])
  sheet = np.asarray(Image.open(out).convert("RGB"))
  cell = 64 * 2
  assert sheet.shape[1] == 2 * (cell + 8) + 8
  # Every sample's zoomed image appears somewhere in the sheet, pixel for pixel.
  for task in taxonomy.TASK_TYPES:
    for i in range(2):
      img = registry.generate(task, "train", i).images[0]
      big = np.repeat(np.repeat(img, 2, axis=0), 2, axis=1)
      x = 8 + i * (cell + 8)
      tops = [y for y in range(sheet.shape[0] - cell)
              if np.array_equal(sheet[y, x:x + cell], big[0])]
      assert any(np.array_equal(sheet[y:y + cell, x:x + cell], big) for y in tops), (task, i)


def test_caption_has_question_options_and_answer():
  ex = registry.generate("general_vqa", "train", 3)
  lines = preview.caption(ex)
  assert lines[0] == f"Q: {ex.question}" and lines[-1] == f"A: {ex.answer}"
  assert all(o in lines[1] for o in ex.options)
