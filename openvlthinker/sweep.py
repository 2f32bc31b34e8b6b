"""Sweep runner: runs a config's `get_sweep(arg)` runs here one after another (`--launch=local`),
prints or runs them on TPU pods with launch/tpu_pod.sh (`--launch=print|tpu`), then writes a
comparison table (markdown) and plot of the held-out evaluation after RL from the finished runs.

  python -m openvlthinker.sweep --config=configs/ablation.py:base=test,seeds=0+1 --workdir=DIR
  python -m openvlthinker.sweep --config=configs/ablation.py:base=tpu_pod:v5p-64 \
      --workdir=gs://bucket/ablation --launch=tpu --tpu_name=pod-a,pod-b --tpu_zone=us-east5-a

Locally, runs of one seed share the SFT stage (trained once, linked into each run); on pods each
run is one `tpu_pod.sh run` with its own workdir under the sweep's (`--mode=all`: SFT included).
The trainer reads no URLs, so on pods a gs://NAME/DIR workdir becomes the bucket's mount,
`--bucket=NAME --workdir=/gcs/NAME/DIR/<run>` (a /gcs/NAME/DIR workdir gets `--bucket=NAME` too).
A finished run (its eval_summary.json written) is not rerun, so an interrupted sweep continues
where it stopped. This machine reads the finished runs and writes the table through etils.epath:
a gs:// workdir needs gcsfs here, and a /gcs/NAME/DIR one that is not mounted here is read as
gs://NAME/DIR.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import shlex
import subprocess
import sys
import threading

import numpy as np
from absl import app, flags
from etils import epath

from openvlthinker import plots, taxonomy

_CONFIG = flags.DEFINE_string("config", None, "Sweep config file[:arg], e.g. configs/ablation.py:base=test")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory holding one subdirectory per run.")
_LAUNCH = flags.DEFINE_enum(
    "launch", "local", ["local", "print", "tpu"],
    "local: run here one after another. print: print one launch/tpu_pod.sh command per run. tpu: "
    "run those commands (one at a time per TPU of --tpu_name), then write the table.")
_TPU_NAME = flags.DEFINE_list(
    "tpu_name", [], "print/tpu: the TPU to run on, or several (comma-separated) to run that many "
    "runs at once; print assigns them in turn.")
_TPU_ZONE = flags.DEFINE_string("tpu_zone", None, "print/tpu: the TPUs' zone.")
_TPU_PROJECT = flags.DEFINE_string("tpu_project", None,
                                   "print/tpu: the gcloud project (default: gcloud's own).")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POD_SCRIPT = "launch/tpu_pod.sh"
GCS_ROOT = "/gcs"  # where tpu_pod.sh --bucket=NAME mounts gs://NAME on every TPU host


def load_sweep(spec: str):
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ValueError(f"--config: {path}: no such file (expected a sweep config such as "
                     "configs/ablation.py)")
  module_spec = importlib.util.spec_from_file_location("sweep_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"--config: {path} has no get_sweep(arg)")
  return module.get_sweep(arg or None)


def _overrides(values: dict) -> list[str]:
  return [f"--config.{k}={v}" for k, v in values.items()]


def run_all(spec: str, workdir: str) -> list[tuple[str, dict]]:
  """Runs every run of the sweep (skipping finished ones); returns [(name, overrides)]."""
  runs = load_sweep(spec)
  for name, values in runs:
    run_dir = os.path.join(workdir, name)
    if os.path.exists(os.path.join(run_dir, "eval_summary.json")):
      continue
    sft_dir = os.path.join(workdir, f"sft_seed{values.get('seed', 0)}")
    base = [sys.executable, "-m", "openvlthinker.main", f"--config={spec}"]
    if not os.path.isdir(os.path.join(sft_dir, "sft")):
      subprocess.run(base + [f"--workdir={sft_dir}", "--mode=sft"] + _overrides(values),
                     check=True)
    os.makedirs(run_dir, exist_ok=True)
    link = os.path.join(run_dir, "sft")
    if not os.path.exists(link):
      os.symlink(os.path.abspath(os.path.join(sft_dir, "sft")), link)
    print(f"[sweep] {name}", flush=True)
    subprocess.run(base + [f"--workdir={run_dir}", "--mode=all"] + _overrides(values),
                   check=True)
  return runs


def pod_config(spec: str) -> str:
  """The sweep's config spec as the pod hosts see it: relative to the repository root (the code
  tpu_pod.sh puts on every host)."""
  path, sep, arg = spec.partition(":")
  relative = os.path.relpath(os.path.abspath(path), ROOT)
  if relative.startswith(".."):
    raise ValueError(f"--config: {path} is outside the repository {ROOT}: the pod hosts only "
                     "have the repository's files")
  return relative + sep + arg


def _split_bucket(path: str, prefix: str) -> tuple[str, str] | None:
  """(bucket, path inside it) of `prefix`NAME[/PATH]; None when `path` is not under `prefix`."""
  if not path.startswith(prefix):
    return None
  bucket, _, rest = path[len(prefix):].partition("/")
  return (bucket, rest.strip("/")) if bucket else None


def pod_workdir(workdir: str) -> tuple[str, str | None]:
  """(the sweep's workdir as the TPU hosts see it, the bucket tpu_pod.sh must mount for it):
  gs://NAME/DIR is /gcs/NAME/DIR with --bucket=NAME, and /gcs/NAME/DIR also gets --bucket=NAME
  (a restarted host has lost its mount). Any other absolute path is passed as it is (a shared
  mount of the user's own); a relative one, or a URL tpu_pod.sh cannot mount, raises ValueError."""
  for prefix in ("gs://", GCS_ROOT + "/"):
    if (split := _split_bucket(workdir, prefix)) is not None:
      bucket, rest = split
      return "/".join(filter(None, (GCS_ROOT, bucket, rest))), bucket
  if "://" in workdir or not os.path.isabs(workdir):
    raise ValueError(f"--workdir: the TPU hosts must share the sweep's workdir: expected "
                     f"gs://BUCKET/DIR (mounted on every host at {GCS_ROOT}/BUCKET/DIR with "
                     f"tpu_pod.sh --bucket=BUCKET) or {GCS_ROOT}/BUCKET/DIR, got {workdir!r}")
  return workdir, None


def local_workdir(workdir: str) -> str:
  """Where this machine reads the runs' files: a /gcs/NAME/DIR workdir whose bucket is not
  mounted here is read as gs://NAME/DIR (through etils.epath, which needs gcsfs)."""
  split = _split_bucket(workdir, GCS_ROOT + "/")
  if split is None or os.path.ismount(os.path.join(GCS_ROOT, split[0])):
    return workdir
  return "gs://" + "/".join(filter(None, split))


def pod_commands(spec: str, workdir: str, runs, tpus: list[str], zone: str,
                 project: str | None = None) -> list[list[str]]:
  """One `launch/tpu_pod.sh run` argv per run (TPUs assigned in turn): the bucket to mount, the
  run's own workdir under the sweep's (as the hosts see it: `pod_workdir`) and its overrides as
  --config.k=v."""
  config = pod_config(spec)
  shared, bucket = pod_workdir(workdir)
  commands = []
  for i, (name, values) in enumerate(runs):
    where = [f"--name={tpus[i % len(tpus)]}", f"--zone={zone}"]
    where += [f"--project={project}"] if project else []
    where += [f"--bucket={bucket}"] if bucket else []
    commands.append([POD_SCRIPT, "run", *where, f"--config={config}",
                     f"--workdir={_join(shared, name)}", *_overrides(values)])
  return commands


def _join(workdir: str, name: str) -> str:
  return workdir.rstrip("/") + "/" + name


def finished(workdir: str, name: str) -> bool:
  return (epath.Path(workdir) / name / "eval_summary.json").exists()


def run_on_pods(spec: str, workdir: str, tpus: list[str], zone: str,
                project: str | None = None) -> list[tuple[str, dict]]:
  """Runs the unfinished runs of the sweep with tpu_pod.sh, one at a time on each TPU of `tpus`
  (each TPU takes the next run when its run ends); returns [(name, overrides)]. Every output line
  is printed prefixed with its run's name. Raises RuntimeError naming the runs that failed (no
  new run starts after a failure)."""
  runs = load_sweep(spec)
  pod_workdir(workdir)  # a workdir the hosts cannot share fails before anything starts
  local = local_workdir(workdir)
  todo = [(name, values) for name, values in runs if not finished(local, name)]
  lock = threading.Lock()
  failed: list[str] = []

  def serve(tpu: str) -> None:
    while True:
      with lock:
        if failed or not todo:
          return
        name, values = todo.pop(0)
      argv = pod_commands(spec, workdir, [(name, values)], [tpu], zone, project)[0]
      print(f"[sweep] {name} on {tpu}: {shlex.join(argv)}", flush=True)
      proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, errors="replace")
      for line in proc.stdout:
        print(f"[{name}] {line}", end="", flush=True)
      if proc.wait():
        with lock:
          failed.append(f"{name} on {tpu} (exit status {proc.returncode})")

  threads = [threading.Thread(target=serve, args=(tpu,), daemon=True) for tpu in tpus]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  if failed:
    raise RuntimeError(f"runs failed: {', '.join(failed)}; rerun the sweep to continue")
  return runs


def summarize(workdir: str, runs) -> dict[str, dict[str, np.ndarray]]:
  """{variant: {"after": float[seeds, T], "before": float[seeds, T]}} of held-out overall reward."""
  out: dict[str, dict[str, list]] = {}
  for name, _ in runs:
    variant = name.rsplit("_seed", 1)[0]
    path = epath.Path(workdir) / name / "eval_summary.json"
    if not path.exists():
      raise FileNotFoundError(f"{path}: missing: run {name} has not finished")
    summary = json.loads(path.read_text())
    entry = out.setdefault(variant, {"after": [], "before": []})
    entry["after"].append(summary["after_rl"]["overall"])
    entry["before"].append(summary["before_rl"]["overall"])
  return {v: {k: np.asarray(x, np.float64) for k, x in e.items()} for v, e in out.items()}


def table(results) -> str:
  tasks = taxonomy.TASK_TYPES
  head = "| variant | " + " | ".join(tasks) + " | mean | tasks above SFT |"
  lines = [head, "|---|" + "---|" * (len(tasks) + 2)]
  fmt = lambda a: f"{np.mean(a):.3f} ± {np.std(a):.3f}"
  first = next(iter(results.values()))
  lines.append("| SFT (before RL) | " + " | ".join(fmt(first["before"][:, t]) for t in
                                                   range(len(tasks))) +
               f" | {fmt(first['before'].mean(1))} | |")
  for variant, r in results.items():
    above = int(np.sum(r["after"].mean(0) > r["before"].mean(0)))  # means over seeds, per task
    lines.append(f"| {variant} | " + " | ".join(fmt(r["after"][:, t]) for t in range(len(tasks)))
                 + f" | {fmt(r['after'].mean(1))} | {above} of {len(tasks)} |")
  seeds = first["after"].shape[0]
  return (f"Held-out overall reward after RL, mean ± std over {seeds} seeds "
          "(greedy decoding):\n\n" + "\n".join(lines) + "\n")


def balance_plot(workdir: str, runs, path: str) -> bool:
  """`plots.plot_task_balance` of each variant's first run that logged task balance
  (`rl.task_balance_every`); False (nothing written) when none did."""
  first: dict[str, list[dict]] = {}
  for name, _ in runs:
    variant = name.rsplit("_seed", 1)[0]
    metrics = epath.Path(workdir) / name / "metrics.jsonl"
    if variant in first or not metrics.exists():
      continue
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if any(k.startswith("grad_norm_task/") for r in records for k in r):
      first[variant] = records
  if not first:
    return False
  buffer = io.BytesIO()
  plots.plot_task_balance(first, buffer)
  epath.Path(path).write_bytes(buffer.getvalue())
  return True


def plot(results, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  tasks = taxonomy.TASK_TYPES
  x = np.arange(len(tasks))
  width = 0.8 / (len(results) + 1)
  fig, ax = plt.subplots(figsize=(10, 3.8))
  first = next(iter(results.values()))
  ax.bar(x, first["before"].mean(0), width, label="SFT", color="0.7")
  for i, (variant, r) in enumerate(results.items(), 1):
    ax.bar(x + i * width, r["after"].mean(0), width, yerr=r["after"].std(0), capsize=2,
           label=variant)
  ax.set_xticks(x + width * len(results) / 2, tasks, rotation=15, fontsize=8)
  ax.set_ylabel("held-out overall reward")
  ax.legend(fontsize=7)
  fig.tight_layout()
  buffer = io.BytesIO()  # savefig writes local files only; epath writes GCS too
  fig.savefig(buffer, format="png", dpi=110)
  plt.close(fig)
  epath.Path(path).write_bytes(buffer.getvalue())


def _fail(message: str):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def main(argv):
  del argv
  if not _CONFIG.value:
    _fail("--config: expected a sweep config such as configs/ablation.py:base=test")
  if not _WORKDIR.value:
    _fail("--workdir: expected the directory that holds one subdirectory per run")
  spec, workdir, launch = _CONFIG.value, _WORKDIR.value, _LAUNCH.value
  if launch != "local":
    if not _TPU_NAME.value:
      _fail(f"--tpu_name: --launch={launch} needs the TPU (or TPUs) to run on")
    if not _TPU_ZONE.value:
      _fail(f"--tpu_zone: --launch={launch} needs the TPUs' zone")
  elif "://" in workdir:
    _fail(f"--workdir: --launch=local runs the trainer here, which reads no URLs: mount the "
          f"bucket (gcsfuse) and pass its path, or use --launch=print|tpu, which mount it on "
          f"the TPU hosts; got {workdir!r}")
  try:
    if launch == "print":
      for argv in pod_commands(spec, workdir, load_sweep(spec), _TPU_NAME.value, _TPU_ZONE.value,
                               _TPU_PROJECT.value):
        print(shlex.join(argv))
      return
    if launch == "tpu":
      runs = run_on_pods(spec, workdir, _TPU_NAME.value, _TPU_ZONE.value, _TPU_PROJECT.value)
      workdir = local_workdir(workdir)
    else:
      runs = run_all(spec, workdir)
    results = summarize(workdir, runs)
  except ImportError as e:  # epath on gs:// without gcsfs
    _fail(f"--workdir: {workdir}: {e}")
  except (ValueError, OSError, RuntimeError, subprocess.CalledProcessError) as e:
    _fail(str(e))
  text = table(results)
  (epath.Path(workdir) / "ablation.md").write_text(text)
  plot(results, os.path.join(workdir, "ablation.png"))
  if balance_plot(workdir, runs, os.path.join(workdir, "task_balance.png")):
    print(f"wrote {os.path.join(workdir, 'task_balance.png')}")
  print(text)


if __name__ == "__main__":
  app.run(main)
