"""Kernels placed per shard of batch and heads (zoo/attention/kernels/
placement.py) equal the unsharded call on 8 fake devices; the mesh axes a
kernel is split over; the fallback warning is logged once."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import xla_flags_with_devices
from zoo import registry
from zoo.attention.kernels import fused_cpu, placement

ROOT = str(pathlib.Path(__file__).resolve().parents[3])
H, D = 4, 8  # heads split over tensor=2; kv heads 2 (split) or 1 (repeated)


def _worker_sharded(cases):
  """On a data x fsdp x tensor = 2 x 2 x 2 mesh under the default rules, the
  largest error, relative to each result's largest entry, of each case's op
  (values and gradients; batch over data+fsdp, heads over tensor) against
  the unsharded call. `cases`: (kv heads, length, spec, padded) tuples."""
  import flax.linen as nn
  from zoo import sharding
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = sharding.parse_rules(sharding.DEFAULT_RULES)
  worst = 0.0
  for g, t, spec, padded in cases:
    rng = np.random.default_rng(g)
    q = rng.standard_normal((4, t, H, D), np.float32)
    k, v = (rng.standard_normal((4, t, g, D), np.float32) for _ in "kv")
    mask = jnp.asarray(rng.random((4, t)) < 0.8) if padded else None
    op = registry.build("attention", spec).for_layer(1)
    step = lambda: jax.jit(jax.value_and_grad(
        lambda q, k, v: jnp.sum(op(q, k, v, causal=True, mask=mask) ** 2),
        argnums=(0, 1, 2)))
    want = step()(q, k, v)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      got = step()(q, k, v)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      worst = max(worst, float(jnp.abs(a - b).max() / jnp.abs(b).max()))
  return worst


def sharded_error(cases):
  """`_worker_sharded(cases)` in a subprocess with 8 fake CPU devices."""
  code = (f"import sys; sys.path.insert(0, {ROOT!r}); "
          "from tests.attention.kernels import test_placement as t; "
          f"print('RESULT', t._worker_sharded({cases!r}))")
  env = dict(os.environ, XLA_FLAGS=xla_flags_with_devices(8))
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-4000:]
  return float(out.stdout.split("RESULT")[-1])


@pytest.mark.slow
@pytest.mark.skipif(fused_cpu.unavailable() is not None,
                    reason=str(fused_cpu.unavailable()))
def test_fused_cpu_kernels_sharded_over_batch_and_heads_equal_unsharded():
  """blockwise's and linear's C++ kernels through `shard_heads`, with GQA
  (kv heads split like the query heads) and MQA (kv heads repeated)."""
  worst = sharded_error([
      (2, 40, "blockwise(implementation='fused')", False),
      (1, 40, "blockwise(implementation='fused')", False),
      (2, 40, "linear(feature='favor', num_features=32, "
              "implementation='fused')", False),
      (1, 40, "linear(implementation='fused')", False)])
  assert worst < 1e-5, worst


def test_outside_a_mesh_the_kernel_runs_as_is():
  calls = []

  def run(q, k, segments):
    calls.append((q.shape, k.shape, segments))
    return q

  q, k = np.ones((2, 3, 4, 1)), np.ones((2, 3, 1, 1))
  assert placement.shard_heads(run, q, k) is q
  assert calls == [((2, 3, 4, 1), (2, 3, 1, 1), None)]
  assert placement.mesh_axes(2, 4) == (None, None, None)


def test_a_fallback_is_logged_once(monkeypatch, caplog):
  monkeypatch.setattr(placement, "_WARNED", set())
  with caplog.at_level("WARNING"):
    for _ in range(3):
      placement.warn_once("attention x: no kernel")
  assert caplog.text.count("attention x: no kernel") == 1
