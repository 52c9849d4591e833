"""The trainer end to end on tiny MQAR: loss falls, files appear, an
interrupted run resumes to the same result, bad configs exit 2."""

import json
import os
import shutil
import subprocess
import sys

import grain
import numpy as np
import pytest

from tests.conftest import make_tiny_config
from zoo import metrics, plan, train
from zoo.plan import ConfigError
from zoo.data import pipeline


@pytest.mark.slow
def test_short_run_learns_and_writes_its_files(tiny_config, tmp_path):
  tiny_config.num_train_steps = 60
  tiny_config.eval_every_steps = 60
  last = train.train_and_evaluate(tiny_config, str(tmp_path))
  rows = metrics.read(str(tmp_path))
  assert [r["step"] for r in rows] == list(range(5, 61, 5))
  assert rows[-1]["loss"] < rows[0]["loss"] - 0.3
  for key in ("loss", "accuracy", "learning_rate", "tokens_per_s",
              "tflops_per_s", "grad_norm"):
    assert np.isfinite(rows[-1][key])
  assert "eval_accuracy" in last and "eval_loss" in last
  assert json.load(open(tmp_path / "config.json"))["model"]["attention"] == (
      "standard")
  assert any(f.startswith("events") for f in os.listdir(tmp_path /
                                                        "tensorboard"))
  assert "60" in os.listdir(tmp_path / "checkpoints")


class _Crash(Exception):
  pass


class _CrashingIterator(grain.DatasetIterator):
  """Passes batches and state through, then dies on batch `limit` + 1."""

  def __init__(self, it, limit):
    super().__init__(it)
    self._it, self._left = it, limit

  def __next__(self):
    if self._left == 0:
      raise _Crash
    self._left -= 1
    return next(self._it)

  def get_state(self):
    return self._it.get_state()

  def set_state(self, state):
    self._it.set_state(state)


@pytest.fixture(scope="module")
def whole_run(data_dir, tmp_path_factory):
  """An uninterrupted run of the tiny config: its workdir and last metrics
  (trained once per module)."""
  workdir = tmp_path_factory.mktemp("whole")
  return workdir, train.train_and_evaluate(make_tiny_config(data_dir),
                                           str(workdir))


@pytest.mark.slow
def test_resume_after_interruption_matches_uninterrupted(tiny_config,
                                                         tmp_path,
                                                         monkeypatch,
                                                         whole_run):
  whole_dir, whole = whole_run
  real = pipeline.train_iterator
  # Dies fetching the batch of step 14; the newest checkpoint is step 10.
  monkeypatch.setattr(pipeline, "train_iterator",
                      lambda *a, **k: _CrashingIterator(real(*a, **k), 13))
  with pytest.raises(_Crash):
    train.train_and_evaluate(tiny_config, str(tmp_path / "resumed"))
  monkeypatch.setattr(pipeline, "train_iterator", real)
  resumed = train.train_and_evaluate(tiny_config, str(tmp_path / "resumed"))
  assert resumed["loss"] == whole["loss"]
  assert resumed["eval_loss"] == whole["eval_loss"]
  rows = metrics.read(str(tmp_path / "resumed"))
  assert [r["step"] for r in rows] == [5, 10, 15, 20]
  assert [r["loss"] for r in rows] == [
      r["loss"] for r in metrics.read(str(whole_dir))]


def _cli(workdir, *overrides):
  return subprocess.run(
      [sys.executable, "-m", "zoo.train", "--config=configs/default.py",
       f"--workdir={workdir}", *overrides],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True, text=True)


@pytest.mark.parametrize("override,message", [
    ("--config.model.attention=no_such", "model.attention: unknown attention"),
    pytest.param("--config.no_such_key=1", "no config key 'no_such_key'",
                 marks=pytest.mark.slow),
    pytest.param("--config.model.position=alibi --config.model.attention="
                 "linear", "attention 'linear' cannot take position 'alibi'",
                 marks=pytest.mark.slow),
    pytest.param("--config.model.position=rope --config.model.attention="
                 "linear", "attention 'linear' cannot take position 'rope'",
                 marks=pytest.mark.slow),
])
def test_bad_config_exits_2_and_writes_nothing(tmp_path, override, message):
  """The command line: exit code 2, one line, no workdir."""
  workdir = tmp_path / "run"
  result = _cli(workdir, *override.split())
  assert result.returncode == 2, result.stderr[-2000:]
  assert message in result.stderr
  assert not workdir.exists()


@pytest.mark.parametrize("key,value,message", [
    ("model.attention", "no_such", "model.attention: unknown attention"),
    ("model.position", "rope9", "model.position: unknown position"),
    ("data.task", "mqar(pairs=3)", "data.task: task 'mqar' has no argument "
     "'pairs'"),
    ("model.num_heads", 3, "embed_dim=64 must be divisible"),
    ("mesh.data", 3, "mesh: mesh {'data': 3, 'fsdp': 1, 'sequence': 1, "
     "'tensor': 1} has 3 devices but 1 are present"),
    ("mesh.sequence", 3, "mesh: mesh {'data': -1, 'fsdp': 1, 'sequence': 3, "
     "'tensor': 1}: 3 does not divide the 1 devices"),
    ("model.dtype", "float8", "model.dtype='float8'; valid: float32"),
    ("model.position", "learned(max_len=8)", "learned(max_len=8) is shorter "
     "than the sequence length 64"),
    ("data.task", "text(path='/no/such/file.txt')", "data.task: task "
     "text(path='/no/such/file.txt'): no file matches"),
    ("model.num_kv_heads", 3, "num_heads=4 must be divisible by "
     "model.num_kv_heads=3"),
    ("batch_size", 0, "batch_size=0 must be >= 1"),
    ("lr_schedule", "linear", "lr_schedule='linear'; valid: cosine, "
     "constant"),
    ("model.attention", "local(window=0)", "model.attention: attention "
     "local(window=...) must be"),
    ("model.attention", "blockwise(block_q=0)", "model.attention: attention "
     "blockwise(block_q=...) must be >= 1"),
    ("model.position", "alibi", "attention 'linear' cannot take position "
     "'alibi'"),
    ("mesh.rules", "heads=model", "mesh.rules item 'heads=model'"),
    ("grad_accum_steps", 3, "grad_accum_steps=3 must be >= 1 and divide "
     "batch_size=32"),
    ("model.remat", "all", "model.remat='all'; valid: none, block, matmuls"),
    ("early_stop", "accuracy>0.9", "early_stop='accuracy>0.9'; valid: ''"),
])
def test_bad_config_is_refused_before_anything(key, value, message, tmp_path):
  """Every refused case: ConfigError naming the key, nothing written."""
  from configs import default
  config = default.get_config()
  if key == "model.position" and value == "alibi":
    config.model.attention = "linear"
  section, _, name = key.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(ConfigError) as error:
    train.check_workdir(plan.resolve(config), str(tmp_path / "run"))
  assert message in str(error.value)
  assert "\n" not in str(error.value)
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name,expected", [
    # (step: learning rate) for peak 1e-2, 10 warmup steps, 100 steps.
    ("cosine", {0: 0.0, 5: 5e-3, 10: 1e-2, 55: 5.5e-3, 100: 1e-3}),
    ("constant", {0: 0.0, 5: 5e-3, 10: 1e-2, 55: 1e-2, 100: 1e-2}),
])
def test_learning_rate_schedules(name, expected):
  """Warmup to the peak, then cosine to a tenth of it at the last step, or
  constant (hand-computed values)."""
  from configs import default
  config = default.get_config()
  config.learning_rate, config.warmup_steps = 1e-2, 10
  config.num_train_steps, config.lr_schedule = 100, name
  schedule = plan.make_optimizer(config)[1]
  for step, rate in expected.items():
    assert float(schedule(step)) == pytest.approx(rate, rel=1e-5), step


@pytest.mark.slow
def test_workdir_of_another_model_is_refused(tiny_config, tmp_path,
                                             whole_run):
  workdir = tmp_path / "run"
  shutil.copytree(whole_run[0], workdir)  # a finished run of tiny_config
  before = sorted(os.listdir(workdir / "checkpoints"))
  tiny_config.model.mlp_dim = 48
  with pytest.raises(ConfigError, match=r"parameter trunk/blocks/0/"
                     r"mlp/down/kernel of shape \(64, 32\), this config makes "
                     r"\(48, 32\)"):
    train.train_and_evaluate(tiny_config, str(workdir))
  assert sorted(os.listdir(workdir / "checkpoints")) == before


@pytest.mark.parametrize("model_name", ["lm", "classifier"])
def test_evaluate_counts_every_example_once(model_name):
  """10 examples in batches of 4 (the last one filled up with zero-weight
  copies): the metrics, those over the recall hits too, equal one pass
  over all 10 at once."""
  import jax
  from flax import nnx
  from zoo import layers, registry
  from zoo.data.mqar import mqar_example
  config = layers.ModelConfig(vocab_size=16, seq_len=8, num_layers=1,
                              embed_dim=16, num_heads=2, num_kv_heads=2,
                              mlp_dim=32, num_classes=3)
  model = registry.get("model", model_name)(config, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  if model_name == "lm":  # with recall hits: metrics over part of a row
    source = [{**mqar_example(rng, 8, 2, 16),
               "hits": rng.random(8) < 0.5} for _ in range(10)]
  else:
    source = [{"inputs": rng.integers(0, 16, 8, dtype=np.int32),
               "mask": np.arange(8) < rng.integers(2, 9),
               "label": np.int32(rng.integers(3))} for _ in range(10)]
  import optax
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  eval_fn = jax.jit(lambda s, b: train.eval_step(graphdef, s, b))
  batch_config = type("C", (), {"batch_size": 4})
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  got = train.evaluate(eval_fn, state, source, batch_config, sharding)
  whole = {k: np.stack([ex[k] for ex in source]) for k in source[0]}
  _, expected = model.loss(whole)
  for key in expected:
    np.testing.assert_allclose(got[key], expected[key], rtol=1e-5)


def _tiny_lm_and_batch(remat="none"):
  import jax
  from flax import nnx
  from zoo import layers, registry
  from zoo.data.mqar import mqar_example
  config = layers.ModelConfig(vocab_size=16, seq_len=8, num_layers=2,
                              embed_dim=16, num_heads=2, num_kv_heads=2,
                              mlp_dim=32, remat=remat, position="learned")
  model = registry.get("model", "lm")(config, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  examples = [mqar_example(rng, 8, 1 + i % 2, 16) for i in range(8)]
  batch = {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}
  return jax, nnx, model, batch


@pytest.mark.parametrize("remat", ["block", "matmuls"])
def test_remat_gives_the_gradients_of_no_remat(remat):
  jax, nnx, plain, batch = _tiny_lm_and_batch()
  _, _, rematted, _ = _tiny_lm_and_batch(remat)
  grad = lambda m: jax.jit(nnx.grad(lambda m: m.loss(batch)[0]))(m)
  for want, got in zip(jax.tree.leaves(grad(plain)),
                       jax.tree.leaves(grad(rematted))):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_gradient_accumulation_makes_the_whole_batchs_update():
  """4 micro-batches of 2 rows whose answer counts differ (1 or 2 pairs):
  the same parameters and metrics after one step as the batch of 8."""
  import optax
  jax, nnx, model, batch = _tiny_lm_and_batch()
  optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  results = [jax.jit(train.make_train_step(graphdef, k))(state, batch)
             for k in (1, 4)]
  (whole, whole_metrics), (accum, accum_metrics) = results
  for want, got in zip(jax.tree.leaves(whole), jax.tree.leaves(accum)):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)
  for key in ("loss", "accuracy", "grad_norm"):
    np.testing.assert_allclose(accum_metrics[key], whole_metrics[key],
                               rtol=1e-5)


@pytest.mark.slow
def test_early_stop_ends_the_run_and_evaluates_the_test_split(tiny_config,
                                                              tmp_path):
  """A rule met at the first evaluation (step 10 of 20): the run ends
  there with a checkpoint and the test split's metrics; started again, it
  trains no further."""
  tiny_config.early_stop = "eval_loss<=1000"
  workdir = str(tmp_path / "run")
  last = train.train_and_evaluate(tiny_config, workdir)
  rows = metrics.read(workdir)
  assert rows[-1]["step"] == 10
  assert last["test_accuracy"] == rows[-1]["test_accuracy"]
  assert "test_accuracy" in rows[-1] and "eval_accuracy" in rows[-1]
  assert "10" in os.listdir(os.path.join(workdir, "checkpoints"))
  again = train.train_and_evaluate(tiny_config, workdir)
  assert again == rows[-1] and metrics.read(workdir) == rows
