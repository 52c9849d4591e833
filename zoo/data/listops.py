"""ListOps (Nangia & Bowman 2018; the Long Range Arena task): nested
MAX / MIN / MED / SM (sum mod 10) expressions over digits, classified by
their value (10 classes) with the encoder model.

Trees are drawn as in LRA's generator: the root is an operator, and below
`max_depth` a node is an operator with probability 0.25 (with 2..`max_args`
children), else a digit;
expressions outside [min_len, seq_len] tokens are redrawn. Tokens: 0 pad,
1-10 the digits 0-9, then "[MAX" "[MIN" "[MED" "[SM" and "]".
"""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from zoo import registry
from zoo.data.source import GeneratedBuilder, prepare_and_load

OPERATORS = ("[MAX", "[MIN", "[MED", "[SM")
VOCAB = ("<pad>",) + tuple(str(d) for d in range(10)) + OPERATORS + ("]",)
TOKEN = {t: i for i, t in enumerate(VOCAB)}


class _TooLong(Exception):
  pass


def draw_tree(rng: np.random.Generator, max_depth: int, max_args: int,
              budget: int):
  """A digit, or (operator, [children]); raises _TooLong past `budget`
  tokens, so oversized trees are abandoned early rather than built."""
  left = [budget]

  def spend(n):
    left[0] -= n
    if left[0] < 0:
      raise _TooLong

  def node(depth):
    if depth == 0 or (depth < max_depth and rng.random() < 0.25):
      op = OPERATORS[rng.integers(len(OPERATORS))]
      spend(2)  # the operator and its closing bracket
      n = int(rng.integers(2, max_args + 1))
      return op, [node(depth + 1) for _ in range(n)]
    spend(1)
    return int(rng.integers(10))

  return node(0)


def evaluate(tree) -> int:
  if isinstance(tree, int):
    return tree
  op, children = tree
  values = [evaluate(c) for c in children]
  if op == "[MAX":
    return max(values)
  if op == "[MIN":
    return min(values)
  if op == "[MED":
    return int(np.median(values))
  return sum(values) % 10


def tokens(tree) -> list[str]:
  if isinstance(tree, int):
    return [str(tree)]
  op, children = tree
  return [op] + [t for c in children for t in tokens(c)] + ["]"]


def listops_example(rng, *, seq_len: int, min_len: int, max_depth: int,
                    max_args: int) -> dict[str, np.ndarray]:
  """inputs (padded to seq_len), mask (real tokens) and label."""
  while True:
    try:
      toks = tokens(tree := draw_tree(rng, max_depth, max_args, seq_len))
    except _TooLong:
      continue
    if len(toks) >= min_len:
      break
  inputs = np.zeros(seq_len, np.int32)
  inputs[:len(toks)] = [TOKEN[t] for t in toks]
  return {"inputs": inputs, "mask": inputs > 0,
          "label": np.int32(evaluate(tree))}


@dataclasses.dataclass
class ListOpsConfig(tfds.core.BuilderConfig):
  seq_len: int = 256
  min_len: int = 16
  max_depth: int = 10
  max_args: int = 10
  num_train: int = 20000
  num_eval: int = 1000
  seed: int = 0


class ListOpsBuilder(GeneratedBuilder):
  """TFDS builder; evaluation never repeats a training expression."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}
  name = "zoo_listops"

  def _info(self):
    t = self.builder_config.seq_len
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "inputs": tfds.features.Tensor(shape=(t,), dtype=np.int32),
            "mask": tfds.features.Tensor(shape=(t,), dtype=np.bool_),
            "label": tfds.features.Tensor(shape=(), dtype=np.int32),
        }))

  def example(self, rng):
    c = self.builder_config
    return listops_example(rng, seq_len=c.seq_len, min_len=c.min_len,
                           max_depth=c.max_depth, max_args=c.max_args)


@registry.register("task", "listops")
class ListOps:
  """ListOps classification (10 classes) for the encoder; expressions of
  `min_len`..data.seq_len tokens (LRA uses up to 2048)."""

  model = "classifier"

  def __init__(self, min_len: int = 16, max_depth: int = 10,
               max_args: int = 10, num_train: int = 20000,
               num_eval: int = 1000, seed: int = 0, *, seq_len: int):
    if not 1 <= min_len <= seq_len:
      raise ValueError(f"task listops(min_len={min_len}) must be in "
                       f"[1, data.seq_len={seq_len}]")
    if max_depth < 1 or max_args < 2:
      raise ValueError("task listops: max_depth must be >= 1 and max_args "
                       ">= 2")
    self.config = ListOpsConfig(
        name=f"t{seq_len}_l{min_len}_d{max_depth}_a{max_args}_{num_train}_"
        f"{num_eval}_s{seed}", seq_len=seq_len, min_len=min_len,
        max_depth=max_depth, max_args=max_args, num_train=num_train,
        num_eval=num_eval, seed=seed)
    self.model_args = {"vocab_size": len(VOCAB), "num_classes": 10}

  def sources(self, data_dir: str | None):
    return prepare_and_load(ListOpsBuilder, self.config, data_dir,
                            {"train": "train", "eval": "test"})
