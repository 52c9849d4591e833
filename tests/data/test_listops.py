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


# LRA's format: binary "( op arg )" nesting around the prefix expression.
LRA_ROWS = [("( ( ( ( [MAX 2 ) 9 ) 4 ) ] )", "[MAX 2 9 4 ]"),
            ("( ( ( [SM 3 ) ( ( ( [MIN 5 ) 8 ) ] ) ) ] )",
             "[SM 3 [MIN 5 8 ] ]"),
            ("( ( ( ( [MED 1 ) 7 ) 3 ) ] )", "[MED 1 7 3 ]")]


def write_lra(folder, rows, header="Source\tTarget"):
  folder.mkdir(exist_ok=True)
  for split in ("train", "val", "test"):
    lines = [header] + [f"{source}\t{reference_value(plain.split())}"
                        for source, plain in rows]
    (folder / f"basic_{split}.tsv").write_text("\n".join(lines) + "\n")
  return str(folder)


def test_lra_files_read_without_parentheses(tmp_path, data_dir):
  path = write_lra(tmp_path / "lra", LRA_ROWS)
  task = registry.build("task", f"listops(path={path!r}, eval_split='test')",
                        seq_len=12)
  sources = task.sources(data_dir)
  want = {(plain, reference_value(plain.split())) for _, plain in LRA_ROWS}
  for split in ("train", "eval"):
    got = set()
    for ex in sources[split]:
      assert not ex["inputs"][~ex["mask"]].any()
      got.add((" ".join(VOCAB[i] for i in ex["inputs"][ex["mask"]]),
               int(ex["label"])))
    assert got == want


def test_lra_files_refused_when_too_long_or_malformed(tmp_path, data_dir):
  path = write_lra(tmp_path / "lra", LRA_ROWS)
  task = registry.build("task", f"listops(path={path!r})", seq_len=6)
  with pytest.raises(ValueError, match=r"basic_train.tsv:3 has 7 tokens .* "
                     r"data.seq_len >= 7"):
    task.sources(data_dir)
  bad = write_lra(tmp_path / "bad", LRA_ROWS, header="Source,Target")
  with pytest.raises(ValueError, match="header must be Source<TAB>Target"):
    registry.build("task", f"listops(path={bad!r})", seq_len=16)
  with pytest.raises(ValueError, match="min_len apply only to generated"):
    registry.build("task", f"listops(path={path!r}, min_len=4)", seq_len=16)
  with pytest.raises(ValueError, match="no .*basic_train.tsv"):
    registry.build("task", f"listops(path={str(tmp_path)!r})", seq_len=16)
