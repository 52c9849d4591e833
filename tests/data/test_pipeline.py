"""grain pipelines and prepared data: resume across processes, process
sharding, determinism, no train/eval overlap."""

import hashlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from zoo import registry
from zoo.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
MQAR = "mqar(num_pairs=4, vocab_size=32, num_train=256, num_eval=32)"


def _digest(batch) -> str:
  h = hashlib.sha1()
  for key in sorted(batch):
    h.update(np.ascontiguousarray(batch[key]).tobytes())
  return h.hexdigest()


def _sources(data_dir, spec=MQAR, seq_len=32):
  return registry.build("task", spec, seq_len=seq_len).sources(data_dir)


def test_restored_iterator_continues_in_a_new_process(data_dir, tmp_path):
  it = pipeline.train_iterator(_sources(data_dir)["train"], global_batch=8,
                               seed=3)
  for _ in range(40):  # past the first epoch of 32 batches
    next(it)
  state_file = tmp_path / "state.json"
  state_file.write_text(json.dumps(it.get_state()))
  expected = [_digest(next(it)) for _ in range(3)]
  code = f"""
import json, sys
sys.path.insert(0, {ROOT!r})
from tests.data.test_pipeline import _digest, _sources
from zoo.data import pipeline
it = pipeline.train_iterator(_sources({data_dir!r})["train"], global_batch=8,
                             seed=3)
it.set_state(json.loads(open({str(state_file)!r}).read()))
print(json.dumps([_digest(next(it)) for _ in range(3)]))
"""
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, cwd=ROOT, check=True)
  assert json.loads(out.stdout.strip().splitlines()[-1]) == expected


def test_epochs_are_reshuffled_and_seeds_differ(data_dir):
  source = _sources(data_dir)["train"]
  it = pipeline.train_iterator(source, global_batch=8, seed=0)
  epoch1 = [_digest(next(it)) for _ in range(32)]
  epoch2 = [_digest(next(it)) for _ in range(32)]
  assert epoch1 != epoch2
  other = pipeline.train_iterator(source, global_batch=8, seed=1)
  assert _digest(next(other)) != epoch1[0]


def test_processes_split_each_global_batch(data_dir, monkeypatch):
  source = _sources(data_dir)["train"]
  single = pipeline.train_iterator(source, global_batch=8, seed=0)
  global_batches = [next(single)["inputs"] for _ in range(5)]
  parts = []
  for index in range(2):
    monkeypatch.setattr(jax, "process_index", lambda i=index: i)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    it = pipeline.train_iterator(source, global_batch=8, seed=0)
    parts.append([next(it)["inputs"] for _ in range(5)])
  for step, whole in enumerate(global_batches):
    local0, local1 = parts[0][step], parts[1][step]
    assert local0.shape == (4, 32)
    rows = lambda a: sorted(map(bytes, a.astype(np.uint8)))
    assert rows(np.concatenate([local0, local1])) == rows(whole)


@pytest.mark.parametrize("spec,seq_len", [
    (MQAR, 32),
    ("listops(min_len=4, max_depth=3, max_args=3, num_train=128, "
     "num_eval=32)", 32)])
def test_preparation_is_deterministic(spec, seq_len, tmp_path):
  digests = []
  for name in ("a", "b"):
    sources = _sources(str(tmp_path / name), spec, seq_len)
    digests.append([_digest(sources["train"][i])
                    for i in range(len(sources["train"]))])
  assert digests[0] == digests[1]


def test_mqar_generator_checksum_is_stable():
  """Pins the generator: a change here changes every prepared dataset."""
  from zoo.data.mqar import mqar_example
  h = hashlib.sha1()
  for i in range(20):
    ex = mqar_example(np.random.default_rng((0, 0, i)), 64, 8, 128)
    h.update(_digest(ex).encode())
  assert h.hexdigest() == "3ae532f80f16713525316d8568de0e7e5953f7c2"


@pytest.mark.parametrize("spec,seq_len", [
    ("mqar(num_pairs=1, vocab_size=16, num_train=64, num_eval=64)", 4),
    ("listops(min_len=3, max_depth=1, max_args=2, num_train=64, "
     "num_eval=64)", 8)])
def test_eval_never_repeats_a_training_example(spec, seq_len, tmp_path):
  """Tiny spaces where duplicates are certain: eval drops them."""
  sources = _sources(str(tmp_path), spec, seq_len)
  train = {sources["train"][i]["inputs"].tobytes()
           for i in range(len(sources["train"]))}
  evals = [sources["eval"][i]["inputs"].tobytes()
           for i in range(len(sources["eval"]))]
  assert evals and not train & set(evals)
  assert len(evals) < 64  # duplicates were there to drop


@pytest.mark.parametrize("with_weights", [True, False])
def test_eval_batches_count_every_example_once(with_weights):
  """10 examples in batches of 4: three batches, the last filled up with
  two zero-weight copies; each real example once with its own weights."""
  source = [{"inputs": np.full(3, i, np.int32)} for i in range(10)]
  if with_weights:
    for i, ex in enumerate(source):
      ex["weights"] = np.full(3, 0.5 + i, np.float32)
  batches = list(pipeline.eval_batches(source, global_batch=4))
  assert len(batches) == 3 and all(len(b["inputs"]) == 4 for b in batches)
  inputs = np.concatenate([b["inputs"][:, 0] for b in batches])
  weights = np.concatenate([b["weights"] for b in batches])
  weights = weights[:, 0] if with_weights else weights
  real = weights > 0
  assert sorted(inputs[real]) == list(range(10))
  assert not real[10:].any()
  expected = (0.5 + np.arange(10)) if with_weights else np.ones(10)
  np.testing.assert_allclose(weights[:10], expected)


def test_data_another_program_prepared_first_is_used(tmp_path, monkeypatch):
  """TFDS's final rename fails when a concurrent program (a sweep's other
  task) prepared the same data first; the prepared data is then read."""
  from zoo.data import mqar
  _sources(str(tmp_path))  # prepared by "the other program"

  def lost_the_race(self, *args, **kwargs):
    raise FileExistsError("Cannot rename ...: Destination already exists.")

  monkeypatch.setattr(mqar.MqarBuilder, "download_and_prepare", lost_the_race)
  sources = _sources(str(tmp_path))
  assert len(sources["train"]) == 256 and len(sources["test"]) > 0
