"""The Colab quickstart notebook: committed without outputs, and runs top to bottom on CPU (the
test config) in a fresh kernel within the five minutes CI allows it."""
import base64
import json
import os
import time

import nbformat
import pytest

from openvlthinker import taxonomy
from tools import strip_notebook

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart_colab_tpu.ipynb")
PNG = b"\x89PNG\r\n\x1a\n"


def test_committed_notebook_is_stripped():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code
  for cell in code:
    assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]
  assert strip_notebook.problems(nb) == [], "run: python tools/strip_notebook.py " + NOTEBOOK


def test_strip_clears_outputs_and_run_metadata():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  cell = next(c for c in nb.cells if c.cell_type == "code")
  cell.execution_count = 3
  cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="hi\n")]
  cell.metadata.update(execution={"iopub.status.idle": "now"}, tags=["keep"])
  assert len(strip_notebook.problems(nb)) == 2
  strip_notebook.strip(nb)
  assert strip_notebook.problems(nb) == []
  assert cell.outputs == [] and cell.execution_count is None and cell.metadata == {"tags": ["keep"]}
  assert nb.metadata["accelerator"] == "TPU"  # Colab's runtime choice stays


@pytest.mark.slow
def test_notebook_runs_on_cpu_with_the_test_config(tmp_path, cli_env):
  from nbclient import NotebookClient  # pylint: disable=g-import-not-at-top
  nb = nbformat.read(NOTEBOOK, as_version=4)
  workdir = tmp_path / "run"
  # The kernel sees the suite's 8 fake CPU devices (XLA_FLAGS) and the entry-point tests'
  # compilation cache; it starts in notebooks/, as Jupyter would, and finds the checkout above.
  env = dict(cli_env, OVT_WORKDIR=str(workdir))
  client = NotebookClient(nb, timeout=280, kernel_name="python3",
                          resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}})
  start = time.monotonic()
  client.execute(env=env)  # raises CellExecutionError naming the cell on any error
  elapsed = time.monotonic() - start
  assert elapsed < 300, f"the notebook took {elapsed:.0f} s"

  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  config = json.loads((workdir / "config.json").read_text())
  steps = lambda stage: sorted(r["step"] for r in records if r["stage"] == stage)
  assert steps("sft") == list(range(1, config["sft"]["steps"] + 1))
  assert steps("rl") == list(range(1, config["rl"]["steps"] + 1))
  assert config["rl"]["steps"] >= 2 and steps("eval")
  # The figures it shows are the files it saved, and the evaluation table is displayed.
  shown = [base64.b64decode(o.data["image/png"]) for o in outputs
           if o.output_type == "display_data" and "image/png" in o.get("data", {})]
  for name in ("quickstart_problems.png", "quickstart_curves.png"):
    saved = (workdir / name).read_bytes()
    assert saved.startswith(PNG) and saved in shown, name
  table = (workdir / "eval_table.md").read_text()
  markdown = [o.data["text/markdown"] for o in outputs
              if o.output_type == "display_data" and "text/markdown" in o.get("data", {})]
  assert table in markdown
  # The sampled responses, scored: a header, then one row per response (a problem of each task
  # type × the notebook's K = 4).
  html = [o.data["text/html"] for o in outputs
          if o.output_type == "display_data" and "text/html" in o.get("data", {})]
  assert len(html) == 1 and html[0].count("<tr>") == 1 + len(taxonomy.TASK_TYPES) * 4
  print(f"notebook executed in {elapsed:.1f} s")
