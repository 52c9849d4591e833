"""Sequence (context) parallelism, `mesh.sequence`, on 8 fake CPU devices:
for every attention family, the loss and gradients of a small LM with its
activations' length sharded (sequence 8; sequence 4 x data 2) equal those
of one device, and the trainer's losses over 20 steps on sequence 4 x data
2 equal one device's.

The pytest process has one device; the checks run this file's `_worker_*`
functions in a subprocess with 8 and read back JSON."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import xla_flags_with_devices
from tests.models.test_decoding import small_spec
from zoo import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = {"sequence8": {"data": 1, "fsdp": 1, "sequence": 8, "tensor": 1},
          "sequence4_data2": {"data": 2, "fsdp": 1, "sequence": 4,
                              "tensor": 1}}


def _run(worker, *args):
  code = (f"import sys; sys.path.insert(0, {ROOT!r}); import json; "
          f"from tests import test_sequence_parallel as t; "
          f"print('RESULT', json.dumps(t.{worker}(*{list(args)!r})))")
  env = dict(os.environ, XLA_FLAGS=xla_flags_with_devices(8))
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-4000:]
  line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


def _worker_loss_and_grads(specs, meshes):
  """{spec: {mesh: [loss relative error, gradient relative error, whether
  the compiled program moves data between devices]}} for each of
  `meshes` (names in MESHES)."""
  import jax
  import numpy as np
  from flax import nnx
  from zoo import layers, sharding, xla_flags
  xla_flags.apply()
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 32, (4, 33))
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "weights": rng.uniform(0.5, 1.5, (4, 32)).astype(np.float32)}
  out = {}
  for spec in specs:
    model = registry.get("model", "lm")(layers.ModelConfig(
        vocab_size=32, seq_len=32, attention=spec, position="none",
        num_layers=1, embed_dim=32, num_heads=4, num_kv_heads=2, mlp_dim=64),
        rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    def loss_and_grads(state, batch):
      return nnx.value_and_grad(lambda m: m.loss(batch)[0])(
          nnx.merge(graphdef, state))

    want_loss, want_grads = jax.jit(loss_and_grads)(state, batch)
    want = np.concatenate([np.ravel(g) for g in jax.tree.leaves(want_grads)])
    out[spec] = {}
    for name in meshes:
      sizes = MESHES[name]
      layout = sharding.Layout(sharding.make_mesh(sizes),
                               sharding.parse_rules(sharding.DEFAULT_RULES))
      with layout:
        step = jax.jit(loss_and_grads)
        hlo = step.lower(state, batch).compile().as_text()
        loss, grads = step(state, batch)
      got = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])
      out[spec][name] = [
          float(abs(loss - want_loss) / abs(want_loss)),
          float(np.abs(got - want).max() / np.abs(want).max()),
          any(c in hlo for c in ("all-gather", "collective-permute",
                                 "all-reduce", "all-to-all"))]
  return out


def _worker_state_passing():
  """{gate: [output relative error, final state relative error, whether
  the compiled program gathers anything as long as the sequence]} of
  recurrence.state_passing over 8 length shards against a float64 numpy
  recurrence."""
  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  from tests.attention import test_recurrence as ref
  from zoo.attention import recurrence
  mesh = jax.make_mesh((8,), ("sequence",),
                       axis_types=(jax.sharding.AxisType.Explicit,))
  out = {}
  for gate in ("scalar", "vector", "none"):
    q, k, v, g, s0 = ref.random_inputs(3, gate, t=32)
    want_o, want_s = ref.numpy_recurrence(q, k, v, g, s0)
    g_j = np.asarray(ref.gate_j(g, k))
    on_length = NamedSharding(mesh, P(None, "sequence"))
    args = [jax.device_put(x, on_length) for x in (q, k, v, g_j)]
    with jax.set_mesh(mesh):
      run = jax.jit(lambda q, k, v, g, s: recurrence.state_passing(
          q, k, v, g, s, chunk=2, axis=("sequence", 8)))
      hlo = run.lower(*args, s0).compile().as_text()
      o, s = run(*args, s0)
    error = lambda a, b: float(np.abs(np.asarray(a) - b).max()
                               / np.abs(b).max())
    gathers_length = any("all-gather" in line and ",32," in line
                         for line in hlo.splitlines())
    out[gate] = [error(o, want_o), error(s, want_s), gathers_length]
  return out


@pytest.mark.slow
def test_state_passing_matches_the_recurrence_and_gathers_only_states():
  for gate, (o_error, s_error, gathers_length) in _run(
      "_worker_state_passing").items():
    assert o_error < 1e-5 and s_error < 1e-5, gate
    assert not gathers_length, gate


def _worker_training(data_dir, tmp, specs):
  """{spec: (data 8's losses, sequence 4 x data 2's losses)} over 20 steps
  of the trainer (data parallel alone matches one device:
  tests/test_sharding.py)."""
  from configs import default
  from zoo import metrics, train, xla_flags
  xla_flags.apply()
  out = {}
  for spec in specs:
    losses = []
    for sizes in ({"data": 8, "sequence": 1}, {"data": 2, "sequence": 4}):
      config = default.get_config()
      config.num_train_steps, config.batch_size = 20, 8
      config.log_every_steps, config.eval_every_steps = 1, 1000
      config.checkpoint_every_steps, config.warmup_steps = 20, 2
      config.model.attention, config.model.num_layers = spec, 2
      config.model.position = "none"
      config.model.embed_dim, config.model.mlp_dim = 32, 64
      config.model.num_heads, config.model.num_kv_heads = 4, 2
      config.data.seq_len, config.data.dir = 32, data_dir
      config.data.task = ("mqar(num_pairs=4, vocab_size=32, num_train=512, "
                          "num_eval=64)")
      config.mesh.data = sizes["data"]
      config.mesh.sequence = sizes["sequence"]
      config.mesh.fsdp = config.mesh.tensor = 1
      workdir = os.path.join(tmp, f"{spec.split('(')[0]}_{sizes['sequence']}")
      train.train_and_evaluate(config, workdir)
      losses.append([r["loss"] for r in metrics.read(workdir)])
    out[spec] = losses
  return out


def _every_family():
  return [small_spec(name) for name in registry.names("attention")]


@pytest.mark.slow
def test_every_family_gives_one_devices_loss_and_gradients():
  """Every family on sequence 4 x data 2; standard on sequence 8 too."""
  specs = _every_family()
  errors = _run("_worker_loss_and_grads", specs, ["sequence4_data2"])
  errors["standard"].update(_run("_worker_loss_and_grads", ["standard"],
                                 ["sequence8"])["standard"])
  assert set(errors["standard"]) == set(MESHES)
  for spec in specs:
    for mesh, (loss_error, grad_error, moves) in errors[spec].items():
      assert loss_error <= 1e-5 and grad_error <= 1e-5, (spec, mesh,
                                                          errors[spec])
      assert moves, (spec, mesh, "the program moves no data: not sharded")


@pytest.mark.slow
def test_training_on_sequence_and_data_shards_matches_one_device(data_dir,
                                                                 tmp_path):
  specs = ["local(window=8)", "deltanet(chunk=8)"]
  runs = _run("_worker_training", data_dir, str(tmp_path), specs)
  for spec in specs:
    one, sharded = runs[spec]
    assert len(one) == len(sharded) == 20
    for a, b in zip(one, sharded):
      assert abs(a - b) <= 1e-4 * abs(a), (spec, one, sharded)
