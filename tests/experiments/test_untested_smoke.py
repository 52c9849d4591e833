"""Cheap checks of the experiments with no test of their own:
length_extrapolation's bits by position and input_pipeline's batch rate.
Each runs in a fresh process: their absl flags share names with other
experiments' (imported in-process by other tests)."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def run(code: str):
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-4000:]
  return out.stdout


BITS = """
import jax.numpy as jnp, numpy as np
from flax import nnx
from experiments import length_extrapolation as le

class Uniform(nnx.Module):
  def __init__(self):
    self.w = nnx.Param(jnp.zeros(()))
  def __call__(self, tokens_BxT):
    return jnp.zeros(tokens_BxT.shape + (256,)) + self.w

data = np.arange(100, dtype=np.int32) % 256
bits = le.bits_by_position(Uniform(), data, 8, 100, batch=4)
assert bits.shape == (8,) and np.allclose(bits, 8.0), bits
try:
  le.bits_by_position(Uniform(), data, 8, 5)
except ValueError as e:
  assert "shorter than one window of 9 bytes" in str(e), e
else:
  raise AssertionError("no ValueError")
print("OK")
"""


def test_length_extrapolation_bits_of_a_uniform_model():
  """Uniform logits over 256 bytes: 8 bits at every position; a budget
  shorter than a window is refused."""
  assert "OK" in run(BITS)


PIPELINE = """
import sys
from configs import default
from experiments import input_pipeline
input_pipeline.flags.FLAGS(["input_pipeline", "--batches=3"])
config = default.get_config()
config.batch_size = 8
config.data.seq_len = 32
config.data.task = ("mqar(num_pairs=4, vocab_size=32, num_train=512, "
                    "num_eval=64)")
config.data.dir = sys.argv[1]
rate = input_pipeline.pipeline_rate(config)
assert rate > 0, rate
print("OK")
"""


def test_input_pipeline_rate_of_the_tiny_task(data_dir):
  out = subprocess.run([sys.executable, "-c", PIPELINE, data_dir], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-4000:]
  assert "OK" in out.stdout
