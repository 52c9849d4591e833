"""experiments/kernels_gpu.py off GPU: a one-line refusal, and the --quick
interpret-mode check writing its report."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def run(*args):
  return subprocess.run([sys.executable, "-m", "experiments.kernels_gpu",
                         *args], cwd=REPO, capture_output=True, text=True,
                        timeout=300)


def test_refuses_without_a_gpu():
  out = run()
  assert out.returncode == 2, out.stderr[-2000:]
  assert ("kernels_gpu needs a GPU; this machine has cpu; use --quick for an "
          "interpret-mode check") in out.stderr.splitlines()
  assert not out.stdout


@pytest.mark.slow
def test_quick_checks_pass_in_interpret_mode(tmp_path):
  out = run("--quick", f"--out={tmp_path}")
  assert out.returncode == 0, out.stderr[-4000:]
  raw = json.loads((tmp_path / "raw.json").read_text())
  assert raw["checks"] and all(row["ok"] for row in raw["checks"])
  assert raw["timings"] == []
  assert "interpret=True" in (tmp_path / "RESULTS.md").read_text()
