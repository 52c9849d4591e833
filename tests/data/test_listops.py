"""ListOps labels against an independent evaluator over the token text."""

import statistics

import numpy as np
import pytest

from zoo import registry
from zoo.data.listops import VOCAB, listops_example


def reference_value(text_tokens: list[str]) -> int:
  """A stack machine over the prefix notation (written for this test)."""
  stack = []
  for tok in text_tokens:
    if tok.startswith("["):
      stack.append([tok])
    elif tok == "]":
      op, *args = stack.pop()
      value = {"[MAX": max, "[MIN": min,
               "[MED": lambda a: int(statistics.median(a)),
               "[SM": lambda a: sum(a) % 10}[op](args)
      if not stack:
        return value
      stack[-1].append(value)
    else:
      stack[-1].append(int(tok))
  raise AssertionError("unbalanced expression")


def test_labels_match_an_independent_evaluator():
  rng = np.random.default_rng(123)
  labels = []
  for _ in range(3000):
    ex = listops_example(rng, seq_len=128, min_len=8, max_depth=6,
                         max_args=5)
    toks = [VOCAB[i] for i in ex["inputs"][ex["mask"]]]
    assert ex["mask"].sum() >= 8 and not ex["inputs"][~ex["mask"]].any()
    assert reference_value(toks) == ex["label"]
    labels.append(int(ex["label"]))
  assert set(labels) == set(range(10))  # every class occurs


def test_lengths_respect_the_bounds():
  rng = np.random.default_rng(0)
  lengths = [listops_example(rng, seq_len=64, min_len=20, max_depth=10,
                             max_args=10)["mask"].sum() for _ in range(300)]
  assert min(lengths) >= 20 and max(lengths) <= 64


def test_task_refuses_bad_bounds():
  with pytest.raises(ValueError, match="min_len=300"):
    registry.build("task", "listops(min_len=300)", seq_len=256)
