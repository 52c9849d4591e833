"""The scaling-law analysis against laws with known exponents: the fits
recover them, the bootstrap intervals cover them, the iso-FLOP view finds
the analytic compute-optimal size; the grid expands as designed."""

import os

import numpy as np
import pytest

from experiments import sweep
from experiments.grids import scaling

E, A, ALPHA, B, BETA = 0.9, 257.0, 0.35, 300.0, 0.3


def law(n, d):
  return E + A * n ** -ALPHA + B * d ** -BETA


def synthetic_runs(noise=0.003, seeds=2, sizes=(2e4, 5e4, 1e5, 2e5, 4e5)):
  rng = np.random.default_rng(1)
  d = 4096.0 * np.arange(40, 641, 40)
  return [scaling.Run("standard", n, d,
                      law(n, d) * np.exp(noise * rng.standard_normal(len(d))))
          for n in sizes for _ in range(seeds)]


def test_joint_fit_recovers_known_exponents():
  runs = synthetic_runs(noise=0.0)
  xs, loss = scaling._points(runs, "ND")
  p = scaling.fit_law(xs, loss)
  assert p[0] == pytest.approx(E, abs=0.02)
  assert p[2] == pytest.approx(ALPHA, abs=0.02)
  assert p[4] == pytest.approx(BETA, abs=0.02)


def test_bootstrap_intervals_cover_the_true_exponents(monkeypatch):
  monkeypatch.setattr(scaling, "BOOTSTRAP", 200)
  fit = scaling.fit_family(synthetic_runs())
  a, lo, hi = fit["ND"]["a"]
  assert lo <= ALPHA <= hi and hi - lo < 0.2, fit["ND"]
  b, lo, hi = fit["ND"]["b"]
  assert lo <= BETA <= hi and hi - lo < 0.2, fit["ND"]
  # At fixed D the loss still holds B D^-b: L(N) sees the N term alone.
  assert fit["N"]["a"][1] <= ALPHA <= fit["N"]["a"][2], fit["N"]
  # Raw slopes (no E) are shallower than the exponents with E.
  assert fit["N"]["raw"][0] < fit["N"]["a"][0]
  assert fit["N"]["bootstrap"] + fit["N"]["skipped"] == scaling.BOOTSTRAP
  # L(D) rests on the largest model's 2 runs: no interval is claimed.
  assert fit["D"]["runs"] == 2 and np.isnan(fit["D"]["b"][1])


def test_iso_flop_finds_the_compute_optimal_size():
  """For L = E + A N^-a + B (C/6N)^-b the optimum is
  N* = (a A / (b B) (C/6)^b)^(1/(a+b))."""
  sizes = np.geomspace(1e4, 1e6, 13)
  runs = synthetic_runs(noise=0.0, seeds=1, sizes=sizes)
  c = 3.9e11  # the optimum near N = 1e5, inside the sizes and curves
  best = (ALPHA * A / (BETA * B) * (c / 6) ** BETA) ** (1 / (ALPHA + BETA))
  (entry,) = scaling.iso_flop(runs, [c])
  assert entry["best_N"] == pytest.approx(best, rel=0.1)
  assert not entry["edge"]


def test_grid_and_analysis_end_to_end(tmp_path, monkeypatch):
  """The quick grid's cells and configs; the analysis of synthetic records
  writes its tables and plot."""
  monkeypatch.setattr(scaling, "BOOTSTRAP", 20)
  text = tmp_path / "t.txt"
  text.write_text("to be or not to be " * 100)
  grid = scaling.get_grid("quick", str(text))
  cells = sweep.expand(grid)
  assert len(cells) == 3 * 3 * 2 and not any(c.error for c in cells)
  c = cells[-1].config
  assert c.lr_schedule == "constant" and c.model.mlp_dim == 4 * 32
  assert c.eval_every_steps * scaling.EVALS == c.num_train_steps
  records = [{"status": "done", "axes": {"model.attention": r.family},
              "params": {"non_embedding": r.n}, "tokens_per_step": 4096,
              "curve": [(d / 4096, 0.0, l) for d, l in zip(r.d, r.loss)]}
             for r in synthetic_runs()]
  records.append({"status": "failed", "axes": {"model.attention": "local"}})
  markdown = scaling.analyze(records, str(tmp_path))
  assert "| standard |" in markdown and "local" not in markdown.split(
      "## Iso-FLOP")[0].split("Published")[0]
  assert os.path.getsize(tmp_path / "scaling_fits.png") > 10000
