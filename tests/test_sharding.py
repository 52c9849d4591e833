"""zoo/sharding.py and the sharded trainer on 8 fake CPU devices.

The pytest process has one device; checks that need 8 run this file's
`_worker_*` functions in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (or 2 processes x 4
devices on 127.0.0.1) and read back JSON."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import xla_flags_with_devices
from zoo import metrics, plan, sharding, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = {"data8": (8, 1, 1), "fsdp8": (1, 8, 1), "d2f2t2": (2, 2, 2)}


def _config(data_dir, mesh=(1, 1, 1), attention="standard", steps=4):
  from configs import default
  config = default.get_config()
  config.num_train_steps = steps
  config.batch_size = 8
  config.log_every_steps = 1
  config.eval_every_steps = 1000
  config.checkpoint_every_steps = 2
  config.warmup_steps = 1
  config.model.attention = attention
  config.model.num_layers = 1
  config.model.embed_dim = 32
  config.model.num_heads = 4
  config.model.num_kv_heads = 2
  config.model.mlp_dim = 64
  config.data.seq_len = 32
  config.data.task = ("mqar(num_pairs=4, vocab_size=32, num_train=512, "
                      "num_eval=64)")
  config.data.dir = data_dir
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
  return config


def _losses(workdir):
  return [r["loss"] for r in metrics.read(workdir)]


def _run(worker, *args, devices=8, env=None):
  code = (f"import sys; sys.path.insert(0, {ROOT!r}); import json; "
          f"from tests import test_sharding as t; "
          f"print('RESULT', json.dumps(t.{worker}(*{list(args)!r})))")
  env = dict(os.environ, **(env or {}),
             XLA_FLAGS=xla_flags_with_devices(devices))
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-4000:]
  line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


def _worker_parity(data_dir, tmp, runs):
  out = {}
  for attention, mesh_name in runs:
    workdir = os.path.join(tmp, f"{attention.split('(')[0]}_{mesh_name}")
    train.train_and_evaluate(_config(data_dir, MESHES[mesh_name], attention),
                             workdir)
    out[f"{attention}/{mesh_name}"] = _losses(workdir)
  return out


# Every mesh for the standard op; the mixed data x fsdp x tensor mesh for the
# local and linear families.
PARITY_RUNS = [("standard", name) for name in MESHES] + [
    ("local(window=8)", "d2f2t2"), ("linear(chunk=8)", "d2f2t2")]


@pytest.fixture(scope="module")
def sharded_losses(data_dir, tmp_path_factory):
  return _run("_worker_parity", data_dir,
              str(tmp_path_factory.mktemp("parity")), PARITY_RUNS)


@pytest.mark.slow
def test_meshes_give_the_losses_of_one_device(sharded_losses, data_dir,
                                              tmp_path):
  """Data, FSDP and mixed data/FSDP/tensor meshes match a single device to
  1e-5 relative (fp32; only reduction order differs)."""
  for attention in sorted({a for a, _ in PARITY_RUNS}):
    workdir = str(tmp_path / f"{attention.split('(')[0]}_single")
    train.train_and_evaluate(_config(data_dir, attention=attention), workdir)
    single = _losses(workdir)
    for name in [m for a, m in PARITY_RUNS if a == attention]:
      np.testing.assert_allclose(sharded_losses[f"{attention}/{name}"],
                                 single, rtol=1e-5,
                                 err_msg=f"{attention} {name}")


def _worker_placement(data_dir):
  import jax
  from flax import nnx
  out = {}
  for name, mesh_sizes in {"fsdp1": (8, 1, 1), "fsdp2": (4, 2, 1),
                           "fsdp8": (1, 8, 1), "d2f2t2": (2, 2, 2)}.items():
    config = _config(data_dir, mesh_sizes)
    p = plan.resolve(config)
    layout = sharding.Layout.from_config(config.mesh)
    s = plan.setup(p, layout, plan.make_optimizer(config)[0])
    with layout:
      state = jax.jit(lambda: nnx.state(s.create()),
                      out_shardings=s.state_shardings)()
    model, opt = state[0], state[1]
    kernel = model["trunk"]["blocks"][0]["mlp"]["up"]["kernel"][...]
    mu = jax.tree.leaves(opt["opt_state"])
    mu_up = [a for a in mu if a.shape == kernel.shape][0]
    q_kernel = model["trunk"]["blocks"][0]["attention"]["query"]["kernel"][...]
    shard = lambda a: list(a.addressable_shards[0].data.shape)
    out[name] = {
        "up_spec": [str(a) for a in kernel.sharding.spec],
        "up_shard": shard(kernel),
        "query_shard": shard(q_kernel),
        "mu_up_spec": [str(a) for a in mu_up.sharding.spec],
        "mu_up_shard": shard(mu_up),
        "bytes_per_device": sum(
            a.addressable_shards[0].data.nbytes
            for a in jax.tree.leaves(state)),
    }
  return out


@pytest.mark.slow
def test_parameters_and_optimizer_state_are_sharded_as_configured(data_dir):
  placed = _run("_worker_placement", data_dir)
  # mlp up kernel [embed 32, mlp 64]: embed over fsdp, mlp over tensor.
  assert placed["fsdp1"]["up_spec"] == ["fsdp", "tensor"]
  assert placed["fsdp1"]["up_shard"] == [32, 64]
  assert placed["fsdp8"]["up_shard"] == [4, 64]
  assert placed["d2f2t2"]["up_shard"] == [16, 32]
  # query kernel [embed 32, heads 4, head_dim 8]
  assert placed["d2f2t2"]["query_shard"] == [16, 2, 8]
  for name in placed:  # Adam's moments follow their parameter
    assert placed[name]["mu_up_spec"] == placed[name]["up_spec"]
    assert placed[name]["mu_up_shard"] == placed[name]["up_shard"]
  per_device = [placed[n]["bytes_per_device"]
                for n in ("fsdp1", "fsdp2", "fsdp8")]
  assert per_device[0] > per_device[1] > per_device[2]


def _worker_reshard(data_dir, tmp):
  config = _config(data_dir, (8, 1, 1), steps=4)
  train.train_and_evaluate(config, os.path.join(tmp, "whole"))
  config.num_train_steps = 2
  resumed = os.path.join(tmp, "resharded")
  train.train_and_evaluate(config, resumed)
  config = _config(data_dir, (1, 4, 2), steps=4)
  train.train_and_evaluate(config, resumed)
  return {"whole": _losses(os.path.join(tmp, "whole")),
          "resharded": _losses(resumed)}


@pytest.mark.slow
def test_checkpoint_restores_onto_another_mesh(data_dir, tmp_path):
  """Saved on data=8, resumed on fsdp=4 x tensor=2. (The first run stops at
  step 2 by its own schedule, so only steps 1-2 of the schedules agree.)"""
  out = _run("_worker_reshard", data_dir, str(tmp_path))
  np.testing.assert_allclose(out["resharded"][:2], out["whole"][:2], rtol=1e-5)
  assert len(out["resharded"]) == 4 and np.isfinite(out["resharded"]).all()


def test_mesh_shape_resolves_the_rest_and_checks_the_count():
  assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (
      4, 2, 1, 1)
  assert sharding.mesh_shape({"data": 2, "fsdp": 1, "sequence": -1,
                              "tensor": 1}, 8) == (2, 1, 4, 1)
  with pytest.raises(ValueError, match="has 6 devices but 8 are present"):
    sharding.mesh_shape({"data": 3, "fsdp": 2, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="3 does not divide the 8 devices"):
    sharding.mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="at most one -1"):
    sharding.mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)


def test_rules_parse_and_refuse_unknown_axes():
  rules = dict(sharding.parse_rules("batch=data+fsdp, heads=tensor"))
  assert rules["batch"] == ("data", "fsdp") and rules["heads"] == "tensor"
  assert rules["embed"] is None and set(rules) == set(sharding.LOGICAL_AXES)
  with pytest.raises(ValueError, match="mesh.rules item 'heads=model'"):
    sharding.parse_rules("heads=model")
  with pytest.raises(ValueError, match="mesh.rules item 'head=tensor'"):
    sharding.parse_rules("head=tensor")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(workdir, flags):
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS=xla_flags_with_devices(4))
  procs = [subprocess.Popen(
      [sys.executable, "-m", "zoo.train", "--config=configs/default.py",
       f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}",
       "--num_processes=2", f"--process_id={i}", *flags],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True) for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  return outs


def _flags(config):
  keys = ["num_train_steps", "batch_size", "log_every_steps",
          "eval_every_steps", "checkpoint_every_steps", "warmup_steps"]
  out = [f"--config.{k}={config[k]}" for k in keys]
  out += [f"--config.model.{k}={config.model[k]}" for k in
          ("num_layers", "embed_dim", "num_heads", "num_kv_heads", "mlp_dim")]
  out += [f"--config.data.seq_len={config.data.seq_len}",
          f"--config.data.task={config.data.task}",
          f"--config.data.dir={config.data.dir}",
          "--config.mesh.data=-1"]
  return out


@pytest.mark.slow
def test_two_processes_train_and_resume_like_one(sharded_losses, data_dir,
                                                 tmp_path):
  """2 processes x 4 devices: train to step 2, a second 2-process run resumes
  to step 4; the losses equal the 1-process 8-device (data=8) run's."""
  reference = sharded_losses["standard/data8"]
  workdir = str(tmp_path / "two")
  config = _config(data_dir)
  _two_processes(workdir, _flags(config) + ["--config.num_train_steps=4",
                                            "--config.checkpoint_every_steps=2"])
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  # Resume: drop the last checkpoint and rerun from step 2.
  import shutil
  shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
  outs = _two_processes(workdir, _flags(config))
  assert "resumed from step 2" in outs[0]
  np.testing.assert_allclose(_losses(workdir), reference, rtol=1e-5)
