"""A contact sheet of task samples: one row per task type, question and answer under each image.

  python -m openvlthinker.tasks.preview --out tasks.png [--per_task 4] [--difficulty 0]
"""
import argparse
import textwrap

from PIL import Image, ImageDraw

from openvlthinker import taxonomy
from openvlthinker.tasks import registry, render

_TEXT = 11  # caption font size in sheet pixels


def caption(example) -> list[str]:
  """The lines written under a sample: question, options, answer."""
  lines = [f"Q: {example.question}"]
  if example.options:
    lines.append("  ".join(example.options))
  lines.append(f"A: {example.answer}")
  return lines


def contact_sheet(per_task: int = 4, difficulty: int = 0, image_size: int = 64, zoom: int = 3,
                  split: str = "train", task_types=taxonomy.TASK_TYPES) -> Image.Image:
  """The sheet as a PIL image, of registry.generate(task, split, i) for i < per_task."""
  cell = image_size * zoom
  chars = max(10, int(cell / (_TEXT * 0.62)))
  rows = []
  for task in task_types:
    examples = [registry.generate(task, split, i, difficulty, image_size) for i in range(per_task)]
    captions = [[w for line in caption(ex) for w in textwrap.wrap(line, chars)] for ex in examples]
    text_h = (max(len(c) for c in captions) + 1) * (_TEXT + 2)
    row = Image.new("RGB", (per_task * (cell + 8) + 8, cell + text_h + 22), render.WHITE)
    draw = ImageDraw.Draw(row)
    draw.text((8, 3), f"{task} (difficulty {difficulty})", font=render.font(_TEXT + 2),
              fill=render.BLACK)
    for i, (ex, lines) in enumerate(zip(examples, captions)):
      x = 8 + i * (cell + 8)
      big = Image.fromarray(ex.images[0]).resize((cell, cell), Image.NEAREST)
      row.paste(big, (x, 20))
      draw.rectangle([x - 1, 19, x + cell, 20 + cell], outline=(160, 160, 160))
      for j, line in enumerate(lines):
        draw.text((x, 24 + cell + j * (_TEXT + 2)), line, font=render.font(_TEXT),
                  fill=(40, 40, 40))
    rows.append(row)
  sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), render.WHITE)
  y = 0
  for row in rows:
    sheet.paste(row, (0, y))
    y += row.height
  return sheet


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="PNG file to write")
  parser.add_argument("--per_task", type=int, default=4)
  parser.add_argument("--difficulty", type=int, default=0)
  parser.add_argument("--image_size", type=int, default=64)
  parser.add_argument("--zoom", type=int, default=3, help="integer upscaling of each image")
  parser.add_argument("--split", default="train", choices=registry.SPLITS)
  args = parser.parse_args(argv)
  if args.per_task < 1 or args.zoom < 1:
    parser.error("--per_task and --zoom must be >= 1")
  sheet = contact_sheet(args.per_task, args.difficulty, args.image_size, args.zoom, args.split)
  sheet.save(args.out)
  print(f"wrote {args.out} ({sheet.width}x{sheet.height} px)")


if __name__ == "__main__":
  main()
