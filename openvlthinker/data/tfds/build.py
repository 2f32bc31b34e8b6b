"""Builds a suite snapshot: `python -m openvlthinker.data.tfds.build --config=small --data_dir=DIR`.

`--train_per_task` / `--eval_per_task` (with `--config=<new name>`) build a custom-size snapshot.
"""
from absl import app
from absl import flags

from openvlthinker.data.tfds import suite_snapshot

_CONFIG = flags.DEFINE_string("config", "small", "Builder config: tiny, small, medium, new.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir to build into.", required=True)
_TRAIN = flags.DEFINE_integer("train_per_task", None, "Custom config: train examples per task.")
_EVAL = flags.DEFINE_integer("eval_per_task", None, "Custom config: eval examples per task.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "Custom config: image side in pixels.")
_DIFFICULTY = flags.DEFINE_integer("difficulty", 0, "Custom config: generator difficulty.")


def main(argv):
  del argv
  config = _CONFIG.value
  if _TRAIN.value is not None or _EVAL.value is not None:
    config = suite_snapshot.SnapshotConfig(
        name=config, train_per_task=_TRAIN.value or 0, eval_per_task=_EVAL.value or 0,
        image_size=_IMAGE_SIZE.value, difficulty=_DIFFICULTY.value)
  builder = suite_snapshot.OpenvlthinkerSuite(config=config, data_dir=_DATA_DIR.value)
  builder.download_and_prepare(file_format="array_record")
  print(builder.info.splits)


if __name__ == "__main__":
  app.run(main)
