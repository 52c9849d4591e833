"""The whole-model throughput benchmark: one measured point, the crossover
rule and where an op stops fitting."""

import pytest

from experiments import model_throughput


def row(spec, length, speed=None, over=False):
  r = {"spec": spec, "length": length}
  if over:
    r["over_limit"] = True
  else:
    r["train_tokens_per_s"] = speed
  return r


def test_crossover_is_where_an_op_stays_faster():
  rows = [row("blockwise", 256, 10), row("blockwise", 1024, 8),
          row("blockwise", 4096, 4), row("local", 256, 5),
          row("local", 1024, 9), row("local", 4096, 7),
          row("linear", 256, 11), row("linear", 1024, 7),
          row("linear", 4096, 5)]
  assert model_throughput.crossover(rows, "local") == 1024
  # Faster at 256 and 4096 but not 1024: only from 4096 on.
  assert model_throughput.crossover(rows, "linear") == 4096
  assert model_throughput.crossover(
      rows + [row("slow", t, 1) for t in (256, 1024, 4096)], "slow") is None


def test_longest_fitting_stops_at_the_first_point_over_the_limit():
  rows = [row("standard", 256, 1), row("standard", 1024, 1),
          row("standard", 4096, over=True), row("local", 256, 1)]
  assert model_throughput.longest_fitting(rows, "standard") == 1024
  assert model_throughput.longest_fitting(rows, "local") == 256
  assert model_throughput.longest_fitting(
      [row("x", 256, over=True)], "x") is None


@pytest.mark.slow
def test_a_point_measures_train_and_prefill():
  r = model_throughput.measure("local", 64, 128, repeats=1, limit=1.0,
                               quick=True)
  assert r["batch"] == 2
  assert r["train_tokens_per_s"] > 0 and r["forward_tokens_per_s"] > 0
  assert 0 < r["forward_bytes"] < r["train_bytes"] < 2**30
  over = model_throughput.measure("local", 64, 128, repeats=1, limit=1e-6,
                                  quick=True)
  assert over["over_limit"] and "train_s" not in over
