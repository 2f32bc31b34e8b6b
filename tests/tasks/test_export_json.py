"""The suite exported as a public-format JSONL set reads back as the same problems: same images,
answers and types, and the same prompt tokens as the suite's own records."""
import numpy as np

from openvlthinker import taxonomy
from openvlthinker.data import json_source, pipeline
from openvlthinker.data.sources import SuiteTaskSource
from openvlthinker.data.tokenizer import load_tokenizer
from openvlthinker.tasks import export_json


def test_exported_set_reads_back_as_the_suites_problems(tmp_path):
  path = export_json.export(str(tmp_path), split="eval", per_task=2)
  source = json_source.JsonSource(path)
  assert len(source) == 2 * taxonomy.NUM_TASKS and not source.skipped
  config = pipeline.DataConfig(source="json", path=path, split="eval", batch_size=4, seq_len=256,
                               prompt_buckets=(64, 128), image_size=64, num_image_tokens=16,
                               max_images=1)
  featurize = pipeline.RlFeatures(config, load_tokenizer())
  for n, got in enumerate(source[i] for i in range(len(source))):
    want = SuiteTaskSource(taxonomy.TASK_TYPES[n // 2], "eval")[n % 2]
    assert (got.uid, got.answer, got.problem_type, got.task_type, got.options) == \
        (want.uid, want.answer, want.problem_type, want.task_type, want.options)
    np.testing.assert_array_equal(got.images[0], want.images[0])  # PNG: lossless
    np.testing.assert_array_equal(featurize(got)["prompt"], featurize(want)["prompt"])
