"""The op contract's pattern and key budget: `keys_per_query` against
closed forms worked out here from each pattern's definition."""

import numpy as np
import pytest

from zoo import registry


def closed_form(spec: str, t: int, causal: bool) -> float:
  """Mean keys per query at length t, counted position by position."""
  i = np.arange(t)
  before, after = i + 1, t - i  # keys j <= i and j >= i
  if spec in ("standard", "blockwise", "linear"):
    return float(np.mean(before if causal else np.full(t, t)))
  if spec == "local(window=5)":
    w = 5
    if causal:
      return float(np.mean(np.minimum(before, w)))
    return float(np.mean(np.minimum(i + w, t - 1) - np.maximum(i - w, 0) + 1))
  if spec == "sparse(pattern='strided', block=4)":
    l = 4
    if causal:  # the l most recent, plus every l-th position further back
      return float(np.mean(np.minimum(before, l) + i // l))
    return float(np.mean(np.minimum(before, l) + np.minimum(after, l) - 1
                         + i // l + (t - 1 - i) // l))
  if spec == "sparse(pattern='fixed', block=4, summary=2)":
    l, c = 4, 2
    own_block = np.minimum((i // l + 1) * l, t) - (i // l) * l
    if causal:  # own block up to i, summaries of all earlier blocks
      return float(np.mean(i % l + 1 + c * (i // l)))
    summary = (np.arange(t) % l >= l - c)
    per_block = np.bincount(np.arange(t) // l, weights=summary)
    return float(np.mean(own_block + per_block.sum() - per_block[i // l]))
  raise KeyError(spec)


SPECS = ["standard", "blockwise", "linear", "local(window=5)",
         "sparse(pattern='strided', block=4)",
         "sparse(pattern='fixed', block=4, summary=2)"]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("t", [13, 600])
def test_keys_per_query_matches_closed_form(spec, causal, t):
  op = registry.build("attention", spec)
  assert op.keys_per_query(t, causal) == pytest.approx(
      closed_form(spec, t, causal))


@pytest.mark.parametrize("causal", [True, False])
def test_bigbird_budget_counts_its_layout(causal):
  """Keys per query from the block layout: whole blocks (the last one
  partial), the diagonal block only up to the query when causal."""
  op = registry.build("attention", "bigbird(block=4)")
  t, heads = 37, 3
  layout = op.block_layout(-(-t // 4), causal, heads)
  sizes = np.diff(np.minimum(np.arange(0, t + 4, 4), t))[:layout.shape[1]]
  total = 0
  for h in range(heads):
    for i in range(t):
      n = i // 4
      row = layout[h, n].copy()
      if causal:
        row[n] = False
        total += i % 4 + 1
      total += sizes[row].sum()
  assert op.keys_per_query(t, causal, heads) == pytest.approx(
      total / (t * heads))


def test_budgets_differ_at_defaults_and_match_when_chosen():
  """At their defaults local, sparse and BigBird differ widely; a local
  window equal to the keys another op sees matches its causal budget up to
  the first window's queries, which see fewer."""
  t = 2048
  budgets = {s: registry.build("attention", s).keys_per_query(t, True)
             for s in ("local", "sparse", "bigbird")}
  assert max(budgets.values()) > 1.5 * min(budgets.values())
  window = round(budgets["bigbird"])
  local = registry.build("attention", f"local(window={window})")
  assert local.keys_per_query(t, True) == pytest.approx(budgets["bigbird"],
                                                        rel=0.15)


def test_pattern_mask_is_per_head_and_causal():
  op = registry.build("attention", "bigbird(block=2)")
  mask = op.pattern_mask(16, True, num_heads=4)
  assert mask.shape == (4, 16, 16)
  assert not np.triu(mask, 1).any()
  assert (mask[0] != mask[1]).any()
