"""safetensors checkpoints: reading single and sharded files (float32 and bfloat16, whole and
sliced, with and without safetensors' numpy API), writing shards as transformers does (its own
loader reads them), atomic and streaming writes, and one-line errors."""
import gc
import json
import os
import re
import subprocess
import sys
import weakref

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file as torch_save_file

import openvlthinker
from openvlthinker.models.hf import safetensors_io
from openvlthinker.models.hf.safetensors_io import (CheckpointReader, HFCheckpointError,
                                                     write_checkpoint)


def _torch_tensors():
  g = torch.Generator().manual_seed(0)
  return {"a.weight": torch.randn(6, 8, generator=g),
          "a.bias": torch.randn(8, generator=g).bfloat16(),
          "b.weight": torch.randn(4, 6, 2, generator=g).bfloat16(),
          "step": torch.tensor(7, dtype=torch.int64)}


def _numpy(t: torch.Tensor) -> np.ndarray:
  if t.dtype == torch.bfloat16:
    return t.float().numpy().astype(ml_dtypes.bfloat16)
  return t.numpy()


@pytest.fixture
def single(tmp_path):
  tensors = _torch_tensors()
  torch_save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "tiny", "hidden_size": 8}))
  return tmp_path, {k: _numpy(v) for k, v in tensors.items()}


def test_reads_torch_written_file_whole_and_sliced(single):
  directory, expected = single
  reader = CheckpointReader(directory)
  assert reader.names() == sorted(expected)
  assert reader.config() == {"model_type": "tiny", "hidden_size": 8}
  for name, x in expected.items():
    assert reader.shape(name) == x.shape and reader.dtype(name) == x.dtype
    got = reader.read(name)
    assert got.dtype == x.dtype
    np.testing.assert_array_equal(got, x)
  np.testing.assert_array_equal(reader.read("a.bias", dtype=np.float32),
                                expected["a.bias"].astype(np.float32))
  b = expected["b.weight"]
  for index in [(slice(1, 3), slice(2, 6)), (slice(None), slice(0, 3), slice(1, 2)), (2,),
                (slice(0, 4), 5), (slice(-2, None),)]:
    got = reader.read_slice("b.weight", index)
    assert got.dtype == b.dtype and got.shape == b[index].shape, index
    np.testing.assert_array_equal(got, b[index])
  np.testing.assert_array_equal(reader.read_slice("b.weight", (slice(0, 4, 2),)), b[0:4:2])
  np.testing.assert_array_equal(reader.read_slice("step", ()), 7)


def test_raw_fallback_reads_bfloat16_blocks(single, monkeypatch):
  """Where safetensors' numpy API does not know bfloat16, the header offsets are used."""
  directory, expected = single

  class NoBf16:
    def __init__(self, path, framework):
      assert framework == "numpy"

    def get_tensor(self, name):
      raise TypeError("data type 'bfloat16' not understood")

    get_slice = get_tensor

  monkeypatch.setattr(safetensors_io, "safe_open", NoBf16)
  reader = CheckpointReader(directory)
  for name, x in expected.items():
    np.testing.assert_array_equal(reader.read(name), x)
  b = expected["b.weight"]
  got = reader.read_slice("b.weight", (slice(1, 3), slice(4, 6)))
  assert got.dtype == b.dtype
  np.testing.assert_array_equal(got, b[1:3, 4:6])


def _arrays(n, size, dtype=np.float32):
  return [(f"t.{i}", np.arange(size, dtype=np.float32).astype(dtype) + i) for i in range(n)]


def test_sharded_write_matches_transformers_layout(tmp_path):
  arrays = _arrays(5, 25)  # 100 bytes each
  out = tmp_path / "ckpt"
  weight_map = write_checkpoint(out, iter(arrays), max_shard_bytes=250)
  files = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
  assert sorted(os.listdir(out)) == files + ["model.safetensors.index.json"]
  index = json.loads((out / "model.safetensors.index.json").read_text())
  assert index["metadata"]["total_size"] == 500
  assert index["weight_map"] == weight_map == {
      "t.0": files[0], "t.1": files[0], "t.2": files[1], "t.3": files[1], "t.4": files[2]}
  reader = CheckpointReader(out)
  assert reader.names() == [n for n, _ in arrays]
  for name, x in arrays:
    np.testing.assert_array_equal(reader.read(name), x)
  np.testing.assert_array_equal(reader.read_slice("t.3", (slice(5, 9),)), arrays[3][1][5:9])
  assert not [f for f in os.listdir(tmp_path) if f != "ckpt"]  # no temporary left behind


def test_single_file_when_it_fits_and_bfloat16(tmp_path):
  arrays = _arrays(3, 10, ml_dtypes.bfloat16)
  write_checkpoint(tmp_path / "c", arrays, max_shard_bytes=1000)
  assert os.listdir(tmp_path / "c") == ["model.safetensors"]
  reader = CheckpointReader(tmp_path / "c")
  for name, x in arrays:
    assert reader.dtype(name) == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(reader.read(name), x)


def test_oversized_tensor_gets_its_own_shard(tmp_path):
  arrays = [("s", np.zeros(4, np.float32)), ("big", np.zeros(100, np.float32)),
            ("t", np.zeros(4, np.float32))]
  weight_map = write_checkpoint(tmp_path / "c", arrays, max_shard_bytes=64)
  assert len(set(weight_map.values())) == 3


def test_write_streams_one_shard_at_a_time(tmp_path):
  """When the first tensor of the third shard is produced, the first shard's are released."""
  refs = []

  def tensors():
    for i in range(6):
      if i == 4:
        gc.collect()
        assert [r() is None for r in refs[:2]] == [True, True]
      x = np.full(25, i, np.float32)
      refs.append(weakref.ref(x))
      yield f"t.{i}", x
      del x

  write_checkpoint(tmp_path / "c", tensors(), max_shard_bytes=200)
  assert len(os.listdir(tmp_path / "c")) == 4


def test_failed_write_leaves_nothing(tmp_path):
  def tensors():
    yield "a", np.zeros(100, np.float32)
    yield "b", np.zeros(100, np.float32)
    raise RuntimeError("disk on fire")

  with pytest.raises(RuntimeError, match="disk on fire"):
    write_checkpoint(tmp_path / "c", tensors(), max_shard_bytes=100)
  assert os.listdir(tmp_path) == []


CRASH = """
import os, sys
import numpy as np
from openvlthinker.models.hf.safetensors_io import write_checkpoint

target, when = sys.argv[1:]
rename = os.rename

def killed_at_swap(src, dst):  # killed before the new checkpoint takes the old one's place
  if dst == target:
    os._exit(3)
  rename(src, dst)

if when == "swap":
  os.rename = killed_at_swap

def tensors():
  for i in range(4):
    if i == 3 and when == "shards":
      os._exit(3)  # killed once two shards are on disk
    yield f"new.{i}", np.zeros(25, np.float32)

write_checkpoint(target, tensors(), max_shard_bytes=100, overwrite=True)
"""


def test_crash_leaves_the_old_checkpoint_or_none(tmp_path):
  write_checkpoint(tmp_path / "old", [("old", np.ones(2, np.float32))], max_shard_bytes=100)
  root = os.path.dirname(os.path.dirname(openvlthinker.__file__))

  def crash(target, when):
    r = subprocess.run([sys.executable, "-c", CRASH, str(tmp_path / target), when],
                       env=dict(os.environ, PYTHONPATH=root), capture_output=True, text=True)
    assert r.returncode == 3, r.stderr

  crash("fresh", "shards")
  crash("old", "shards")
  assert not (tmp_path / "fresh").exists()
  assert CheckpointReader(tmp_path / "old").names() == ["old"]
  # Killed between moving the old checkpoint aside and renaming the new one: the old one is
  # whole, in the hidden sibling it was moved to.
  crash("old", "swap")
  assert not (tmp_path / "old").exists()
  (aside,) = [f for f in os.listdir(tmp_path) if f.startswith(".old.old-")]
  assert CheckpointReader(tmp_path / aside / "old").names() == ["old"]


def test_existing_directory_is_replaced_only_when_asked(tmp_path):
  out = tmp_path / "c"
  write_checkpoint(out, _arrays(2, 4), max_shard_bytes=10)  # sharded
  (out / "config.json").write_text("{}")
  with pytest.raises(HFCheckpointError, match=f"{re.escape(str(out))} exists and is not empty; "
                     "pass overwrite"):
    write_checkpoint(out, _arrays(1, 4), max_shard_bytes=100)
  write_checkpoint(out, [("new", np.ones(3, np.float32))], max_shard_bytes=100, overwrite=True)
  assert os.listdir(out) == ["model.safetensors"]
  assert CheckpointReader(out).names() == ["new"]
  assert os.listdir(tmp_path) == ["c"]
  (tmp_path / "empty").mkdir()
  write_checkpoint(tmp_path / "empty", _arrays(1, 4), max_shard_bytes=100)
  assert os.listdir(tmp_path / "empty") == ["model.safetensors"]
  with pytest.raises(ValueError, match="repeated"):
    write_checkpoint(tmp_path / "d", [("x", np.zeros(1)), ("x", np.zeros(1))], max_shard_bytes=9)


def test_errors_name_directory_file_and_tensor(tmp_path, single):
  where = re.escape(str(tmp_path))
  with pytest.raises(HFCheckpointError, match=f"^HF checkpoint {where}/nope: no such directory$"):
    CheckpointReader(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(HFCheckpointError, match="empty: no model.safetensors or model.safetensors"):
    CheckpointReader(tmp_path / "empty")
  (tmp_path / "empty" / "model.safetensors").write_bytes(
      (single[0] / "model.safetensors").read_bytes())
  with pytest.raises(HFCheckpointError, match=f"^HF checkpoint {where}/empty: no config.json$"):
    CheckpointReader(tmp_path / "empty").config()
  with pytest.raises(HFCheckpointError, match=f"^HF checkpoint {where} has no tensor a.nope$"):
    CheckpointReader(single[0]).read("a.nope")
  out = tmp_path / "sharded"
  write_checkpoint(out, _arrays(3, 4), max_shard_bytes=20)
  index = json.loads((out / "model.safetensors.index.json").read_text())
  index["weight_map"]["t.0"] = "model-00003-of-00003.safetensors"
  (out / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(HFCheckpointError, match="^tensor t.0 is not in .*/model-00003-of-00003"
                     ".safetensors, the shard that model.safetensors.index.json names for it$"):
    CheckpointReader(out).shape("t.0")
  os.remove(out / "model-00002-of-00003.safetensors")
  with pytest.raises(HFCheckpointError, match="index .*/sharded/model.safetensors.index.json "
                     "names shard model-00002-of-00003.safetensors, which is missing$"):
    CheckpointReader(out)


def test_transformers_loads_what_write_checkpoint_writes(tmp_path):
  transformers = pytest.importorskip("transformers")
  config = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, tie_word_embeddings=False)
  torch.manual_seed(0)
  model = transformers.Qwen2ForCausalLM(config)
  state = {k: v.detach().to(torch.bfloat16) for k, v in model.state_dict().items()}
  out = tmp_path / "hf"
  write_checkpoint(out, ((k, _numpy(v)) for k, v in state.items()), max_shard_bytes=8_000)
  config.save_pretrained(out)
  assert (out / "model.safetensors.index.json").exists()
  loaded = transformers.Qwen2ForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
  got = loaded.state_dict()
  assert sorted(got) == sorted(state)
  for k, v in state.items():
    assert torch.equal(got[k], v), k
