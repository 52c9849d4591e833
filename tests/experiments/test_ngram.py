"""The Kneser-Ney byte baselines (experiments/ngram.py): proper
distributions, counts and continuation counts as the formula has them."""

import math

import numpy as np
import pytest

from experiments import ngram

TEXT = b"the cat sat on the mat; the cat ate the rat. " * 20


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("context", [b"", b"t", b"the c", b"zzz", b"at"])
def test_each_context_gives_a_distribution(n, context):
  model = ngram.KneserNey(TEXT, n)
  total = sum(model.probability(context, b) for b in range(256))
  assert total == pytest.approx(1.0, abs=1e-9)
  assert min(model.probability(context, b) for b in range(256)) > 0


def test_bigram_by_hand():
  """'ab' twice and 'ac' once after 'a' (top order: counts); bytes follow
  a distinct preceding byte: a after b and c, b and c after a."""
  model = ngram.KneserNey(b"abacab", 2)
  # Unigram continuation: N1+(. w) over N1+(. .) = 4 types (ba ca ac ab).
  unigram = lambda w: (max({"a": 2, "b": 1, "c": 1}.get(w, 0) - 0.75, 0)
                       + 0.75 * 3 / 256) / 4
  want = (2 - 0.75 + 0.75 * 2 * unigram("b")) / 3
  assert model.probability(b"a", ord("b")) == pytest.approx(want)


def test_baselines_on_a_file(tmp_path):
  path = tmp_path / "t.txt"
  path.write_bytes(TEXT)
  bits = ngram.baselines(str(path), seq_len=16)
  assert list(bits) == [f"{n}-gram (Kneser-Ney)" for n in (2, 3, 4)]
  assert all(0 < b < math.log2(256) for b in bits.values())
  assert bits["4-gram (Kneser-Ney)"] < bits["2-gram (Kneser-Ney)"]
