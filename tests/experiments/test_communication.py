"""The collectives of the compiled train step pinned against the analytic
model (a sharding regression, an accidental replication or an extra
all-gather, changes these bytes), and the HLO parsing on written lines."""

import json
import os
import subprocess
import sys

import pytest

from experiments import communication

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  out = tmp_path_factory.mktemp("communication")
  result = subprocess.run(
      [sys.executable, "-m", "experiments.communication", "--quick",
       f"--out={out}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(out / "raw.json") as f:
    return json.load(f)


@pytest.mark.slow
def test_data_parallel_all_reduces_the_gradients_once(quick):
  m = quick["data8"]
  got = m["collectives"]["all-reduce"]["result_bytes"]
  assert got == pytest.approx(m["param_bytes_total"], rel=0.01)
  assert m["collectives"]["all-gather"]["result_bytes"] == 0
  assert m["param_bytes_per_device"] == m["param_bytes_total"]


@pytest.mark.slow
def test_fsdp_gathers_parameters_once_and_reduces_gradients_once(quick):
  m = quick["fsdp8"]
  c = m["collectives"]
  total = m["param_bytes_total"]
  assert c["all-gather"]["result_bytes"] == pytest.approx(total, rel=0.05)
  # XLA:CPU reduces gradients by all-reduce + slice (reduce-scatter on
  # accelerators): one full reduction of the gradients either way.
  reduced = (c["all-reduce"]["result_bytes"]
             + 8 * c["reduce-scatter"]["result_bytes"])
  assert reduced == pytest.approx(total, rel=0.05)
  assert m["param_bytes_per_device"] <= total / 8 * 1.05


@pytest.mark.slow
def test_tensor_parallel_all_reduces_activations_per_layer(quick):
  m = quick["tensor8"]
  got = m["collectives"]["all-reduce"]["result_bytes"]
  assert got == pytest.approx(m["expected"]["all_reduce"], rel=0.01)


def test_hlo_lines_are_parsed():
  line = ("%all-reduce.59 = (f32[16,64,64]{2,1,0}, bf16[8]{0}) all-reduce("
          "%a, %b), channel_id=16, replica_groups=mesh['axis_0'=2,'axis_1'=4]"
          " {'axis_1'}, use_global_device_ids=true")
  assert communication.shape_bytes("(f32[16,64,64]{2,1,0}, bf16[8]{0})") == (
      16 * 64 * 64 * 4 + 16)
  assert communication.group_size(line) == 4
  assert communication.group_size("x replica_groups=[2,4]<=[8] y") == 4
  assert communication.group_size("x replica_groups={{0,1,2}} y") == 3
  c = communication.collectives(line)
  assert c["all-reduce"]["count"] == 1
  assert c["all-reduce"]["wire_bytes"] == pytest.approx(
      2 * 3 / 4 * (16 * 64 * 64 * 4 + 16))
