"""ListOps (Nangia & Bowman 2018; the Long Range Arena task): nested
MAX / MIN / MED / SM (sum mod 10) expressions over digits, classified by
their value (10 classes) with the encoder model.

Trees are drawn as in LRA's generator: the root is an operator, and below
`max_depth` a node is an operator with probability 0.25 (with 2..`max_args`
children), else a digit;
expressions outside [min_len, seq_len] tokens are redrawn. Tokens: 0 pad,
1-10 the digits 0-9, then "[MAX" "[MIN" "[MED" "[SM" and "]".

With `path`, the task reads LRA's released files instead
(`listops(path="/data/lra_release/listops-1000")`: basic_train.tsv for
training, basic_val.tsv or basic_test.tsv for evaluation). Each is TSV with
a `Source<TAB>Target` header; a source is whitespace-separated tokens in
the vocabulary above plus "(" and ")", which are dropped, as LRA's input
pipeline drops them (its tokenizer keeps alphanumeric tokens; its later
revision keeps "]" by renaming it, as we keep it); the target is the value
0-9. An example longer than data.seq_len is refused, naming the longest:
cutting a prefix expression changes what its label means.
"""

import dataclasses
import hashlib
import os

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


def features(seq_len: int) -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      "inputs": tfds.features.Tensor(shape=(seq_len,), dtype=np.int32),
      "mask": tfds.features.Tensor(shape=(seq_len,), dtype=np.bool_),
      "label": tfds.features.Tensor(shape=(), dtype=np.int32),
  })


def padded(token_ids: list[int], label: int,
           seq_len: int) -> dict[str, np.ndarray]:
  """inputs (padded to seq_len), mask (real tokens) and label."""
  inputs = np.zeros(seq_len, np.int32)
  inputs[:len(token_ids)] = token_ids
  return {"inputs": inputs, "mask": inputs > 0, "label": np.int32(label)}


def listops_example(rng, *, seq_len: int, min_len: int, max_depth: int,
                    max_args: int) -> dict[str, np.ndarray]:
  """A random expression (see the module docstring), `padded`."""
  while True:
    try:
      toks = tokens(tree := draw_tree(rng, max_depth, max_args, seq_len))
    except _TooLong:
      continue
    if len(toks) >= min_len:
      break
  return padded([TOKEN[t] for t in toks], evaluate(tree), seq_len)


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

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "First version.",
                   "1.1.0": "A validation split."}
  name = "zoo_listops"

  def _info(self):
    return self.dataset_info_from_configs(
        features=features(self.builder_config.seq_len))

  def example(self, rng, split):
    del split  # every split is drawn alike
    c = self.builder_config
    return listops_example(rng, seq_len=c.seq_len, min_len=c.min_len,
                           max_depth=c.max_depth, max_args=c.max_args)


LRA_SPLITS = {"train": "basic_train.tsv", "val": "basic_val.tsv",
              "test": "basic_test.tsv"}


def read_lra_tsv(path: str):
  """Yields (line number, token ids, label) of an LRA ListOps TSV file;
  raises ValueError naming the file and line of anything else."""
  with open(path) as f:
    header = f.readline().rstrip("\n").split("\t")
    if header != ["Source", "Target"]:
      raise ValueError(f"{path}: the header must be Source<TAB>Target; got "
                       f"{header}")
    for number, line in enumerate(f, start=2):
      fields = line.rstrip("\n").split("\t")
      if fields == [""]:
        continue
      if len(fields) != 2 or fields[1].strip() not in list("0123456789"):
        raise ValueError(f"{path}:{number}: want SOURCE<TAB>TARGET with a "
                         f"target 0-9; got {line.strip()[:80]!r}")
      tokens = [t for t in fields[0].split() if t not in ("(", ")")]
      unknown = [t for t in tokens if t not in TOKEN or t == "<pad>"]
      if unknown:
        raise ValueError(f"{path}:{number}: unknown token {unknown[0]!r}; "
                         f"valid: {' '.join(VOCAB[1:])} ( )")
      yield number, [TOKEN[t] for t in tokens], int(fields[1])


@dataclasses.dataclass
class ListOpsTsvConfig(tfds.core.BuilderConfig):
  path: str = ""
  seq_len: int = 2048
  eval_split: str = "val"


class ListOpsTsvBuilder(tfds.core.GeneratorBasedBuilder):
  """TFDS builder over LRA's ListOps TSV files; the config name carries the
  files' sizes and modification times, so replaced files are prepared
  afresh."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}
  name = "zoo_listops_lra"

  def _info(self):
    return self.dataset_info_from_configs(
        features=features(self.builder_config.seq_len))

  def _split_generators(self, dl_manager):
    del dl_manager
    c = self.builder_config
    files = [os.path.join(c.path, LRA_SPLITS[s]) for s in ("train",
                                                           c.eval_split)]
    longest = max(((len(ids), f"{f}:{n}") for f in files
                   for n, ids, _ in read_lra_tsv(f)), key=lambda p: p[0])
    if longest[0] > c.seq_len:
      raise ValueError(
          f"task listops(path={c.path!r}): {longest[1]} has {longest[0]} "
          f"tokens (parentheses dropped), more than data.seq_len="
          f"{c.seq_len}; set data.seq_len >= {longest[0]}")
    return {"train": self._generate_examples(files[0]),
            "test": self._generate_examples(files[1])}

  def _generate_examples(self, path):
    for number, ids, label in read_lra_tsv(path):
      yield number, padded(ids, label, self.builder_config.seq_len)


@registry.register("task", "listops")
class ListOps:
  """ListOps classification (10 classes) for the encoder; expressions of
  `min_len`..data.seq_len tokens (LRA uses up to 2048), or LRA's released
  files in the directory `path` (evaluated on `eval_split`, val or test).
  """

  model = "classifier"

  def __init__(self, min_len: int = 16, max_depth: int = 10,
               max_args: int = 10, num_train: int = 20000,
               num_eval: int = 1000, seed: int = 0, path: str = "",
               eval_split: str = "val", *, seq_len: int):
    self.model_args = {"vocab_size": len(VOCAB), "num_classes": 10}
    if path:
      self._lra(path, eval_split, seq_len, dict(
          min_len=min_len, max_depth=max_depth, max_args=max_args,
          num_train=num_train, num_eval=num_eval, seed=seed))
      return
    if eval_split != "val":
      raise ValueError("task listops(eval_split=...) applies only to LRA's "
                       "files (path=...)")
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
    self.builder = ListOpsBuilder

  def _lra(self, path: str, eval_split: str, seq_len: int, generator: dict):
    """Checks the LRA files' presence and headers (their lengths are
    checked when they are prepared)."""
    defaults = {p.name: p.default for p in
                registry.params("task", "listops") if p.name in generator}
    changed = [k for k, v in generator.items() if v != defaults[k]]
    if changed:
      raise ValueError(f"task listops(path=...) reads LRA's files; "
                       f"{', '.join(changed)} apply only to generated data")
    if eval_split not in ("val", "test"):
      raise ValueError(f"task listops(eval_split={eval_split!r}) must be "
                       "'val' or 'test'")
    stamp = []
    for split in ("train", eval_split):
      file = os.path.join(path, LRA_SPLITS[split])
      if not os.path.isfile(file):
        raise ValueError(f"task listops(path={path!r}): no {file}; want "
                         "LRA's listops-1000 folder (basic_train.tsv, "
                         "basic_val.tsv, basic_test.tsv)")
      next(read_lra_tsv(file), None)  # checks the header
      st = os.stat(file)
      stamp.append(f"{st.st_size}.{st.st_mtime_ns}")
    digest = hashlib.sha1(
        f"{os.path.abspath(path)}|{'|'.join(stamp)}".encode()).hexdigest()
    self.config = ListOpsTsvConfig(
        name=f"t{seq_len}_{eval_split}_{digest[:12]}", path=path,
        seq_len=seq_len, eval_split=eval_split)
    self.builder = ListOpsTsvBuilder

  def sources(self, data_dir: str | None):
    """Train and eval sources; generated data also has a test split (eval
    is then its validation split), LRA's files the one `eval_split`
    names."""
    splits = {"train": "train", "eval": "test"}
    if self.builder is ListOpsBuilder:
      splits = {"train": "train", "eval": "validation", "test": "test"}
    return prepare_and_load(self.builder, self.config, data_dir, splits)
