"""The copying task (zoo/data/copying.py): the copy is the loss, test
splits at 1x, 1.5x and 2x the training lengths, bad arguments refused,
and a run reports every test split."""

import numpy as np
import pytest

from zoo import metrics, registry, train
from zoo.data import copying


def _length(ex) -> int:
  return int(ex["weights"].sum())


def test_example_copies_the_string_after_the_separator():
  ex = copying.copy_example(np.random.default_rng(0), 20, 18, 5, 5)
  inputs, targets, weights = ex["inputs"], ex["targets"], ex["weights"]
  symbols = inputs[:5]
  assert inputs[5] == copying.SEP and (symbols >= 2).all()
  assert list(np.flatnonzero(weights)) == [5, 6, 7, 8, 9]
  np.testing.assert_array_equal(targets[weights > 0], symbols)
  assert (inputs[11:] == 0).all()


def test_splits_hold_the_lengths_of_their_scale(tmp_path):
  task = registry.build("task", "copy(max_len=8, vocab_size=20, "
                        "num_train=64, num_eval=32)", seq_len=32)
  sources = task.sources(str(tmp_path))
  lengths = {name: {_length(sources[name][i])
                    for i in range(len(sources[name]))} for name in sources}
  assert max(lengths["train"]) <= 8 and max(lengths["eval"]) <= 8
  assert lengths["test"] <= set(range(7, 9))
  assert lengths["test_x15"] <= set(range(11, 13))
  assert lengths["test_x2"] <= set(range(15, 17))


@pytest.mark.parametrize("spec,seq_len,message", [
    ("copy(max_len=8)", 31, "data.seq_len >= 4 x max_len = 32"),
    ("copy(vocab_size=17)", 128, "vocab_size=17) must be >= 18"),
])
def test_bad_arguments_are_refused(spec, seq_len, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(
      ")", r"\)")):
    registry.build("task", spec, seq_len=seq_len)


@pytest.mark.slow
def test_a_run_reports_every_test_split(tiny_config, tmp_path):
  tiny_config.data.task = ("copy(max_len=8, vocab_size=20, num_train=256, "
                           "num_eval=32)")
  tiny_config.model.position = "rope"
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config, workdir)
  last = metrics.read(workdir)[-1]
  for name in ("test", "test_x15", "test_x2"):
    assert 0 <= last[f"{name}_accuracy"] <= 1
