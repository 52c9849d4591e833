"""The results writer's statistics: the Student-t interval, best-over-axis
selection, equal-time values and the Pareto front."""

import math

import numpy as np
import pytest
from scipy import stats

from experiments import grids, provenance, report


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


def test_best_is_chosen_on_validation_and_reported_on_test():
  analysis = grids.Analysis(metric="acc", best_over=("learning_rate",))
  records = [{**cell("a", lr, s, test), "selection_value": val}
             for lr, val, test in ((0.1, 0.9, 0.5), (0.01, 0.8, 0.7))
             for s in range(2)]
  (row,) = report.summarize(records, analysis)
  assert row["best"] == {"learning_rate": 0.1} and row["mean"] == 0.5


def test_paired_differences_successes_and_steps_to_threshold():
  analysis = grids.Analysis(metric="acc", reference_line="ref",
                            success_threshold=0.9)
  ref = [0.95, 0.99, 0.91]
  other = [0.5, 0.97, 0.2]
  records = ([cell("ref", 0.1, s, v) for s, v in enumerate(ref)]
             + [cell("other", 0.1, s, v) for s, v in enumerate(other)]
             + [cell("other", 0.1, 3, 0.9)])  # no reference seed 3
  ref_row, other_row = report.summarize(records, analysis)
  diff = np.subtract(other, ref)
  low, high = stats.t.interval(0.95, 2, loc=diff.mean(),
                               scale=stats.sem(diff))
  mean, half, n = other_row["paired"]
  assert n == 3 and (mean - half, mean + half) == pytest.approx((low, high))
  assert ref_row["paired"] is None
  assert (ref_row["successes"], other_row["successes"]) == (3, 2)
  table = report.sweep_tables([ref_row, other_row], analysis)
  assert "3/3 seeds ≥ 0.9" in table and "minus ref" in table
  assert analysis.first_success([(10, 0.5), (20, 0.92), (30, 0.95)]) == 20
  assert analysis.first_success([(10, 0.5)]) is None


def test_stale_note_names_what_changed_since_a_commit():
  made = provenance.provenance()
  assert made["jax"] and made["cpu"]
  if made["commit"] is None:
    pytest.skip("not a git checkout")
  note = provenance.stale_note([{**made, "dirty": False}])
  assert ("Stale" in note) == bool(provenance.changed_since(made["commit"]))
  note = provenance.stale_note([{"commit": "0" * 40, "dirty": False}])
  assert "Stale" in note and "not in this checkout" in note
