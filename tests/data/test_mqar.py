import numpy as np

from zoo import registry
from zoo.data.mqar import mqar_example


def test_answers_are_the_values_that_followed_the_queried_keys():
  for seed in range(200):
    ex = mqar_example(np.random.default_rng(seed), 64, 8, 128)
    x, y, w = ex["inputs"], ex["targets"], ex["weights"]
    pairs = {x[i]: x[i + 1] for i in range(0, 16, 2)}
    assert len(pairs) == 8
    assert all(1 <= key < 64 for key in pairs)
    assert all(64 <= value < 128 for value in pairs.values())
    answers = np.flatnonzero(w)
    assert len(answers) == 8 and (answers >= 16).all()
    assert sorted(x[answers]) == sorted(pairs)
    for p in answers:
      assert y[p] == pairs[x[p]]
    assert not x[16:][w[16:] == 0].any()  # filler elsewhere


def test_task_rejects_sizes_that_do_not_fit():
  import pytest
  with pytest.raises(ValueError, match="num_pairs <= "):
    registry.build("task", "mqar(num_pairs=20)", seq_len=64)
  with pytest.raises(ValueError, match="vocab_size >= 18"):
    registry.build("task", "mqar(num_pairs=8, vocab_size=16)", seq_len=64)


def test_prepared_splits_read_back(data_dir):
  task = registry.build("task", "mqar(num_pairs=4, vocab_size=32, "
                        "num_train=64, num_eval=16)", seq_len=32)
  sources = task.sources(data_dir)
  assert len(sources["train"]) == 64 and 0 < len(sources["eval"]) <= 16
  ex = sources["train"][0]
  assert ex["inputs"].shape == (32,) and ex["weights"].sum() == 4
