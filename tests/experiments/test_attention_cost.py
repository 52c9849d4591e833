"""The cost benchmark's fits: exponents over a length range, against
length and against visited pairs."""

import numpy as np
import pytest

from experiments import attention_cost


def rows(times, pairs=None):
  return [{"length": t, "forward_backward_min_s": s,
           **({"pairs": p} if pairs else {})}
          for t, s, p in zip([1024, 2048, 4096, 8192], times,
                             pairs or [None] * 4)]


def test_exponent_is_the_slope_inside_the_range():
  # Quadratic below 2048 (outside the range), linear from 2048 on.
  data = rows([0.01, 0.04, 0.08, 0.16])
  assert attention_cost.exponent(
      data, "forward_backward_min_s", 2048, 8192) == pytest.approx(1.0)
  assert attention_cost.exponent(
      data, "forward_backward_min_s", 1024, 8192) > 1.1


def test_exponent_against_pairs_removes_a_growing_budget():
  # Keys per query grow as sqrt(T): time is T^1.5, linear in pairs.
  lengths = np.array([1024, 2048, 4096, 8192])
  pairs = list(lengths * np.sqrt(lengths))
  data = rows(list(1e-6 * np.array(pairs)), pairs)
  assert attention_cost.exponent(
      data, "forward_backward_min_s", 2048, 8192) == pytest.approx(1.5)
  assert attention_cost.exponent(
      data, "forward_backward_min_s", 2048, 8192, "pairs") == pytest.approx(
          1.0)


def test_too_few_points_give_none():
  assert attention_cost.exponent(rows([0.1, 0.2, 0.4, 0.8]),
                                 "forward_backward_min_s", 8192, 8192) is None


def test_measure_records_times_memory_and_the_key_budget():
  row = attention_cost.measure("local(window=16)", 64, repeats=2, limit=1.0)
  assert row["forward_backward_min_s"] <= row["forward_backward_s"]
  assert row["forward_backward_bytes"] > 0
  assert row["keys_per_query"] == pytest.approx((64 * 16 - 120) / 64)
