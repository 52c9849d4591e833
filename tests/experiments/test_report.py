"""The results writer's statistics: the Student-t interval, best-over-axis
selection, equal-time values and the Pareto front."""

import math

import numpy as np
import pytest
from scipy import stats

from experiments import grids, report


def test_mean_ci_by_hand_and_against_scipy():
  mean, half, n = report.mean_ci([1.0, 2.0, 3.0])
  # s = 1, t(0.975, 2 dof) = 4.302653: half-width 4.302653 / sqrt(3).
  assert (mean, n) == (2.0, 3) and half == pytest.approx(2.484138, abs=1e-6)
  x = np.random.default_rng(0).normal(size=7)
  low, high = stats.t.interval(0.95, 6, loc=x.mean(), scale=stats.sem(x))
  mean, half, n = report.mean_ci(x)
  assert (mean - half, mean + half) == pytest.approx((low, high))
  assert report.mean_ci([0.5])[0] == 0.5 and math.isnan(
      report.mean_ci([0.5])[1])
  assert report.mean_ci([])[2] == 0


def cell(attention, lr, seed, value, status="done", train_s=10.0,
         tokens_per_s=100.0, curve=None):
  return {"name": f"{attention}-{lr}-{seed}", "status": status,
          "axes": {"model.attention": attention, "learning_rate": lr,
                   "seed": seed},
          "value": value, "attention": attention, "keys_per_query": 8.0,
          "train_s": train_s, "tokens_per_s": tokens_per_s,
          "curve": curve or [(10, train_s, value)]}


def test_best_over_an_axis_is_the_best_mean_over_seeds():
  analysis = grids.Analysis(metric="acc", best_over=("learning_rate",))
  records = ([cell("a", 0.1, s, v) for s, v in enumerate([0.2, 0.99, 0.3])]
             + [cell("a", 0.01, s, v) for s, v in enumerate([0.8, 0.9, 0.85])]
             + [cell("b", 0.1, 0, None, status="failed"),
                cell("b", 0.01, 0, None, status="pending")])
  a, b = report.summarize(records, analysis)
  assert a["best"] == {"learning_rate": 0.01}
  assert (a["mean"], a["n"]) == (pytest.approx(0.85), 3)
  assert (b["n"], b["failed"], b["unfinished"]) == (0, 1, 1)
  table = report.sweep_tables([a, b], analysis)
  assert "0.85 ± 0.12 (n=3)" in table and "| 0.01 |" in table


def test_equal_time_values_and_pareto_front():
  analysis = grids.Analysis(metric="bpb", higher_is_better=False,
                            time_views=True)
  fast = [cell("fast", 0.1, s, 2.0, train_s=10.0, tokens_per_s=100.0,
               curve=[(5, 5.0, 3.0), (10, 10.0, 2.0)]) for s in range(2)]
  slow = [cell("slow", 0.1, s, 1.5, train_s=20.0, tokens_per_s=50.0,
               curve=[(5, 5.0, 3.5), (10, 15.0, 2.5), (20, 20.0, 1.5)])
          for s in range(2)]
  worse = [cell("worse", 0.1, s, 2.5, train_s=20.0, tokens_per_s=50.0)
           for s in range(2)]
  rows = report.summarize(fast + slow + worse, analysis)
  assert [r["time_budget_s"] for r in rows] == [10.0] * 3
  assert [r["at_time"][0] for r in rows[:2]] == [2.0, pytest.approx(3.0)]
  assert rows[2]["at_time"][2] == 0  # first evaluated after 20 s
  assert [r["pareto"] for r in rows] == [True, True, False]
