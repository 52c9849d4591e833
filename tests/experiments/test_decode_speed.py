"""experiments/decode_speed.py --quick: one family end to end, its report
written."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def test_quick_run_writes_its_report(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "experiments.decode_speed", "--quick",
       "--ops=local(window=16)", f"--out={tmp_path}"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-4000:]
  rows = json.loads((tmp_path / "raw.json").read_text())["rows"]
  assert [(r["length"], r["family"]) for r in rows] == [
      (32, "ring buffer"), (64, "ring buffer")]
  assert rows[0]["cache_bytes"] == rows[1]["cache_bytes"]
  assert all(r["decode_tokens_per_s"] > 0 and r["speedup"] > 0 for r in rows)
  assert (tmp_path / "decode_speed.png").exists()
  assert "ring buffer" in (tmp_path / "RESULTS.md").read_text()
