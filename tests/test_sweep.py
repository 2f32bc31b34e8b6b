"""The ablation runner: 2 estimators on the test config end to end (table and plot written), and
the seed-averaged table and resume logic on finished runs of 2 seeds; on pods, the printed
launch/tpu_pod.sh commands and the tpu launcher (a stand-in for tpu_pod.sh)."""
import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest

from openvlthinker import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = "configs/ablation.py:base=test,estimators=g2rpo+grpo,seeds=0+1,shaping=off"
SPEC_ONE_SEED = "configs/ablation.py:base=test,estimators=g2rpo+grpo,seeds=0,shaping=off"


def test_sweep_lists_runs_seed_major():
  runs = sweep.load_sweep(os.path.join(ROOT, SPEC))
  assert [n for n, _ in runs] == ["g2rpo_shaping-off_seed0", "grpo_shaping-off_seed0",
                                  "g2rpo_shaping-off_seed1", "grpo_shaping-off_seed1"]
  assert runs[1][1] == {"seed": 0, "rl.advantage": "grpo", "rl.length.enabled": False,
                        "rl.entropy.enabled": False}


def test_bad_sweep_arg_names_the_key():
  with pytest.raises(ValueError, match="estimatorz"):
    sweep.load_sweep(os.path.join(ROOT, "configs/ablation.py:estimatorz=grpo"))


@pytest.mark.slow
def test_ablation_runner_on_test_config(tmp_path, cli_env):
  env = cli_env  # 8 devices; the suite's shared compilation cache
  workdir = str(tmp_path / "sweep")
  proc = subprocess.run([sys.executable, "-m", "openvlthinker.sweep", f"--config={SPEC_ONE_SEED}",
                         f"--workdir={workdir}"], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # SFT ran once for the seed and is shared by its runs.
  assert sorted(d for d in os.listdir(workdir) if d.startswith("sft_")) == ["sft_seed0"]
  assert os.path.realpath(os.path.join(workdir, "grpo_shaping-off_seed0", "sft")) == \
      os.path.join(workdir, "sft_seed0", "sft")
  text = open(os.path.join(workdir, "ablation.md")).read()
  assert "| g2rpo_shaping-off |" in text and "| grpo_shaping-off |" in text
  assert os.path.getsize(os.path.join(workdir, "ablation.png")) > 0
  # Each estimator's per-task advantage spread and gradient shares (rl.task_balance_every).
  with open(os.path.join(workdir, "task_balance.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # The table's numbers are the runs' own held-out evaluations.
  after = json.load(open(os.path.join(workdir, "grpo_shaping-off_seed0",
                                      "eval_summary.json")))["after_rl"]["overall"]
  row = next(l for l in text.splitlines() if l.startswith("| grpo_shaping-off |"))
  cells = [c.strip() for c in row.strip("|").split("|")][1:]
  assert float(cells[0].split(" ± ")[0]) == pytest.approx(np.nan_to_num(after[0]), abs=6e-4)


def test_finished_runs_are_not_rerun_and_the_table_averages_seeds(tmp_path, monkeypatch):
  """Two seeds of finished runs (their eval summaries written here): nothing is launched, and the
  table's cells are the mean ± std over seeds of each task's held-out reward."""
  launched = []
  monkeypatch.setattr(sweep.subprocess, "run", lambda *a, **k: launched.append(a))
  rng = np.random.default_rng(0)
  workdir = str(tmp_path)
  written = {}
  for name, _ in sweep.load_sweep(os.path.join(ROOT, SPEC)):
    os.makedirs(os.path.join(workdir, name))
    summary = {"before_rl": {"overall": rng.random(6).tolist()},
               "after_rl": {"overall": rng.random(6).tolist()}}
    written[name] = summary
    with open(os.path.join(workdir, name, "eval_summary.json"), "w") as f:
      json.dump(summary, f)
  runs = sweep.run_all(os.path.join(ROOT, SPEC), workdir)
  assert not launched
  text = sweep.table(sweep.summarize(workdir, runs))
  assert "mean ± std over 2 seeds" in text
  after = np.array([written[f"grpo_shaping-off_seed{s}"]["after_rl"]["overall"] for s in (0, 1)])
  row = next(l for l in text.splitlines() if l.startswith("| grpo_shaping-off |"))
  cells = [c.strip() for c in row.strip("|").split("|")][1:]
  for t in range(6):
    mean, std = (float(x) for x in cells[t].split(" ± "))
    assert mean == pytest.approx(after[:, t].mean(), abs=6e-4)
    assert std == pytest.approx(after[:, t].std(), abs=6e-4)
  mean_cell = float(cells[6].split(" ± ")[0])
  assert mean_cell == pytest.approx(after.mean(1).mean(), abs=6e-4)


def test_print_gives_one_tpu_pod_command_per_run_with_its_workdir_and_overrides():
  """--launch=print: each line, parsed as a shell would, is `launch/tpu_pod.sh run` on the TPUs
  in turn, mounting the sweep's bucket, with the sweep's config (relative to the repository),
  the run's workdir under the sweep's (gs://bucket/sweep as the hosts mount it,
  /gcs/bucket/sweep), and the run's overrides as --config.k=v; tpu_pod.sh accepts it."""
  spec = "configs/ablation.py:base=tpu_pod:v5p-64,estimators=g2rpo+grpo,seeds=0+1,shaping=off"
  proc = subprocess.run([sys.executable, "-m", "openvlthinker.sweep", f"--config={spec}",
                         "--workdir=gs://bucket/sweep/", "--launch=print",
                         "--tpu_name=pod-a,pod-b", "--tpu_zone=us-east5-a", "--tpu_project=p"],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  lines = [shlex.split(l) for l in proc.stdout.splitlines()]
  runs = sweep.load_sweep(os.path.join(ROOT, spec))
  assert len(lines) == len(runs) == 4
  for i, (argv, (name, values)) in enumerate(zip(lines, runs)):
    assert argv[:7] == ["launch/tpu_pod.sh", "run", f"--name={('pod-a', 'pod-b')[i % 2]}",
                        "--zone=us-east5-a", "--project=p", "--bucket=bucket",
                        f"--config={spec}"]
    assert argv[7] == f"--workdir=/gcs/bucket/sweep/{name}"
    assert argv[8:] == [f"--config.{k}={v}" for k, v in values.items()]
  assert lines[1][8:10] == ["--config.seed=0", "--config.rl.advantage=grpo"]
  dry = subprocess.run(["bash", lines[1][0], "run", "--dry-run", *lines[1][2:]], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
  assert dry.returncode == 0 and dry.stderr == "", dry.stderr
  mount, run = dry.stdout.splitlines()
  assert "gcsfuse --implicit-dirs --rename-dir-limit=200000 bucket /gcs/bucket;" in mount
  assert "--workdir=/gcs/bucket/sweep/grpo_shaping-off_seed0 --config.seed=0" in run


@pytest.mark.parametrize("workdir, on_pods", [
    ("gs://bkt/a/sweep/", ("/gcs/bkt/a/sweep", "bkt")),
    ("gs://bkt", ("/gcs/bkt", "bkt")),
    ("/gcs/bkt/sweep", ("/gcs/bkt/sweep", "bkt")),  # mounted again after a restart
    ("/mnt/filestore/sweep", ("/mnt/filestore/sweep", None)),  # a shared mount of one's own
])
def test_the_pods_see_a_gs_workdir_as_its_mount(workdir, on_pods):
  assert sweep.pod_workdir(workdir) == on_pods


@pytest.mark.parametrize("workdir", ["runs/sweep", "s3://b/sweep", "gs://"])
def test_a_workdir_the_pods_cannot_share_fails(workdir):
  with pytest.raises(ValueError, match=r"^--workdir: the TPU hosts must share"):
    sweep.pod_workdir(workdir)


def test_print_with_a_workdir_the_pods_cannot_share_and_local_with_a_url_fail_in_one_line():
  for launch, workdir in (("print", "runs/sweep"), ("local", "gs://bkt/sweep")):
    proc = subprocess.run([sys.executable, "-m", "openvlthinker.sweep", f"--config={SPEC}",
                           f"--workdir={workdir}", f"--launch={launch}", "--tpu_name=p",
                           "--tpu_zone=z"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: --workdir: ")
    assert "gcsfuse" in proc.stderr if launch == "local" else "/gcs/BUCKET" in proc.stderr


def test_this_machine_reads_an_unmounted_gcs_path_through_its_url(tmp_path, monkeypatch):
  monkeypatch.setattr(sweep, "GCS_ROOT", str(tmp_path / "gcs"))
  assert sweep.local_workdir(f"{tmp_path}/gcs/bkt/a/sweep") == "gs://bkt/a/sweep"
  (tmp_path / "gcs" / "bkt").mkdir(parents=True)  # a directory, not yet a mount: not read
  assert sweep.local_workdir(f"{tmp_path}/gcs/bkt/a/sweep") == "gs://bkt/a/sweep"
  mounts = {f"{tmp_path}/gcs/bkt"}  # mounted here too
  monkeypatch.setattr(sweep.os.path, "ismount", lambda p: str(p) in mounts)
  assert sweep.local_workdir(f"{tmp_path}/gcs/bkt/a/sweep") == f"{tmp_path}/gcs/bkt/a/sweep"
  assert sweep.local_workdir("gs://bkt/sweep") == "gs://bkt/sweep"
  assert sweep.local_workdir("runs/sweep") == "runs/sweep"


def test_print_and_tpu_need_a_tpu_and_zone():
  proc = subprocess.run([sys.executable, "-m", "openvlthinker.sweep", f"--config={SPEC}",
                         "--workdir=gs://b/s", "--launch=print", "--tpu_zone=z"], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and proc.stderr.startswith("error: --tpu_name:")
  with pytest.raises(ValueError, match="outside the repository"):
    sweep.pod_config("/tmp/ablation.py:base=test")


def _fake_pod_script(tmp_path, fail: str = ""):
  """A stand-in for launch/tpu_pod.sh run: records its arguments, then writes the run's
  eval_summary.json into --workdir (a local directory here), or fails for the run named `fail`."""
  script = tmp_path / "fake_tpu_pod.py"
  calls = tmp_path / "calls"
  calls.mkdir()
  script.write_text(f"""#!{sys.executable}
import json, os, sys, time
args = dict(a.split("=", 1) for a in sys.argv[2:] if "=" in a)
workdir = args["--workdir"]
name = os.path.basename(workdir)
with open(os.path.join({str(calls)!r}, name), "w") as f:
  json.dump(sys.argv[1:], f)
print("training", name)
time.sleep(0.2)
if name == {fail!r}:
  sys.exit(4)
os.makedirs(workdir, exist_ok=True)
seed = int(args["--config.seed"])
with open(os.path.join(workdir, "eval_summary.json"), "w") as f:
  json.dump({{"before_rl": {{"overall": [0.5] * 6}},
             "after_rl": {{"overall": [0.6 + seed] * 6}}}}, f)
""")
  script.chmod(0o755)
  return str(script), calls


def test_tpu_runs_the_unfinished_runs_on_each_tpu_then_the_table_reads_them(tmp_path,
                                                                           monkeypatch, capsys):
  script, calls = _fake_pod_script(tmp_path)
  monkeypatch.setattr(sweep, "POD_SCRIPT", script)
  workdir = str(tmp_path / "sweep")
  done = os.path.join(workdir, "g2rpo_shaping-off_seed0")
  os.makedirs(done)
  with open(os.path.join(done, "eval_summary.json"), "w") as f:
    json.dump({"before_rl": {"overall": [0.5] * 6}, "after_rl": {"overall": [0.6] * 6}}, f)
  runs = sweep.run_on_pods(os.path.join(ROOT, SPEC), workdir, ["pod-a", "pod-b"], "z")
  assert sorted(os.listdir(calls)) == ["g2rpo_shaping-off_seed1", "grpo_shaping-off_seed0",
                                       "grpo_shaping-off_seed1"]  # the finished run is skipped
  tpus = {json.load(open(calls / n))[1] for n in os.listdir(calls)}
  assert tpus == {"--name=pod-a", "--name=pod-b"}
  assert "[grpo_shaping-off_seed1] training grpo_shaping-off_seed1" in capsys.readouterr().out
  results = sweep.summarize(workdir, runs)
  np.testing.assert_allclose(results["grpo_shaping-off"]["after"][:, 0], [0.6, 1.6])


def test_tpu_mounts_the_bucket_of_a_gs_workdir_and_reads_the_runs_through_the_url(tmp_path,
                                                                                   monkeypatch):
  """A gs://bkt/sweep workdir: each run gets --bucket=bkt and its workdir under the mount
  (GCS_ROOT, here a local directory standing in for /gcs), while this machine, where the bucket is
  not mounted, asks gs://bkt/sweep (through etils.epath) which runs have finished."""
  script, calls = _fake_pod_script(tmp_path)
  monkeypatch.setattr(sweep, "POD_SCRIPT", script)
  gcs = tmp_path / "gcs"
  monkeypatch.setattr(sweep, "GCS_ROOT", str(gcs))
  asked = []
  monkeypatch.setattr(sweep, "finished",
                      lambda workdir, name: asked.append(workdir) or name.endswith("seed0"))
  runs = sweep.run_on_pods(os.path.join(ROOT, SPEC), "gs://bkt/sweep", ["pod-a"], "z")
  assert len(runs) == 4 and set(asked) == {"gs://bkt/sweep"}
  assert sorted(os.listdir(calls)) == ["g2rpo_shaping-off_seed1", "grpo_shaping-off_seed1"]
  argv = json.load(open(calls / "grpo_shaping-off_seed1"))
  assert argv[1:5] == ["--name=pod-a", "--zone=z", "--bucket=bkt",
                       f"--config={os.path.relpath(os.path.join(ROOT, SPEC), ROOT)}"]
  assert argv[5] == f"--workdir={gcs}/bkt/sweep/grpo_shaping-off_seed1"
  assert os.path.exists(gcs / "bkt" / "sweep" / "grpo_shaping-off_seed1" / "eval_summary.json")


def test_tpu_stops_at_a_failed_run_and_names_it(tmp_path, monkeypatch):
  script, calls = _fake_pod_script(tmp_path, fail="grpo_shaping-off_seed0")
  monkeypatch.setattr(sweep, "POD_SCRIPT", script)
  with pytest.raises(RuntimeError, match=r"grpo_shaping-off_seed0 on pod-a \(exit status 4\)"):
    sweep.run_on_pods(os.path.join(ROOT, SPEC), str(tmp_path / "sweep"), ["pod-a"], "z")
  assert sorted(os.listdir(calls)) == ["g2rpo_shaping-off_seed0", "grpo_shaping-off_seed0"]
  with pytest.raises(FileNotFoundError, match="grpo_shaping-off_seed0 has not finished"):
    sweep.summarize(str(tmp_path / "sweep"), sweep.load_sweep(os.path.join(ROOT, SPEC)))
