"""The experiments' grid files load for every preset and expand for the
CPU ones, and the key-budget helper picks sizes within the budget."""

import dataclasses

import numpy as np
import pytest

from experiments import grids, sweep
from zoo import registry

GRIDS = "experiments/grids/"


@pytest.mark.parametrize("preset", grids.PRESETS)
@pytest.mark.parametrize("name", ["mqar", "listops", "text", "copying"])
def test_grid_files_expand(name, preset, tmp_path):
  arg = f"{GRIDS}{name}.py"
  if name == "text":
    (tmp_path / "t.txt").write_text("to be or not to be " * 200)
    arg += f":{tmp_path / 't.txt'}"
  grid = sweep.load_grid(arg, preset)
  if preset == "full":
    return  # expanding matches budgets at length 2048: slow for a test
  cells = sweep.expand(grid)
  assert not [c.error for c in cells if c.error]
  assert {c.axes["seed"] for c in cells} == {0, 1, 2}
  if name in ("mqar", "copying"):
    assert all(c.config.model.attention.startswith("conv;") for c in cells)
    return
  families = {c.axes["model.attention"] for c in cells}
  assert {"standard", "local", "sparse", "bigbird"} <= families
  assert {"linear(feature='elu')", "linear(feature='favor')"} <= families
  budgeted = [c for c in cells if c.axes["model.attention"] == "local"]
  assert all(c.config.model.attention.startswith("local(window=")
             for c in budgeted)


def test_text_grid_needs_a_file():
  with pytest.raises(ValueError, match="needs a file"):
    sweep.load_grid(f"{GRIDS}text.py", "quick")


@dataclasses.dataclass(frozen=True)
class FakeWindow:
  """Sees the last `window` keys (causal) or `window` on each side."""

  window: int = 1

  def keys_per_query(self, t: int, causal: bool) -> float:
    return float(min(self.window if causal else 2 * self.window + 1, t))


@dataclasses.dataclass(frozen=True)
class FakeStrided:
  """A band of `block` keys plus every `block`-th key: fewest at
  block = sqrt(t)."""

  block: int = 1

  def keys_per_query(self, t: int, causal: bool) -> float:
    del causal
    return float(min(self.block + t / self.block, t))


def test_at_budget_picks_the_largest_size_within_the_budget(monkeypatch):
  assert grids.sizes(40) == [1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 13, 16, 19, 23,
                             27, 32, 38]
  parts = registry._PARTS["attention"]  # pylint: disable=protected-access
  monkeypatch.setitem(parts, "fake", FakeWindow)
  monkeypatch.setitem(grids.BUDGET_ARGS, "fake", "window")
  grids.at_budget.cache_clear()
  assert grids.at_budget("fake", 32, 256, True) == "fake(window=32)"
  assert grids.at_budget("fake", 31.5, 256, True) == "fake(window=27)"
  assert grids.at_budget("fake", 33, 256, False) == "fake(window=16)"
  assert grids.at_budget("fake", 0.5, 256, True) == "fake(window=1)"
  monkeypatch.setitem(parts, "strided", FakeStrided)
  monkeypatch.setitem(grids.BUDGET_ARGS, "strided", "block")
  assert grids.at_budget("strided", 40, 256, True) == "strided(block=32)"
  assert grids.at_budget("strided", 20, 256, True) == "strided(block=16)"
  assert grids.at_budget("fake", 300, 256, True) == "fake(window=256)"
  assert grids.at_budget("fake(window=5)", 33, 256, True) == "fake(window=5)"
  assert grids.at_budget("standard", 8, 256, True) == "standard"
  grids.at_budget.cache_clear()


def test_mqar_ceiling_is_the_share_of_answers_within_reach():
  """'conv;local(window=8)': the conv layer reaches 3 tokens back, the
  window 7 more, so a query reaches the answer's value token when it
  lies at most 10 positions back; dense stacks have no ceiling."""
  from experiments.grids import mqar
  from zoo.data.mqar import mqar_example
  assert mqar._ceiling("conv;standard", 2, 4, 64, 4, 64) is None
  got = mqar._ceiling("conv;local(window=8)", 2, 4, 64, 4, 64, examples=64)
  rng = np.random.default_rng(12345)
  near = []
  for _ in range(64):
    ex = mqar_example(rng, 64, 4, 64)
    for q in np.flatnonzero(ex["weights"]):
      value_at = np.flatnonzero(ex["inputs"][:q] == ex["inputs"][q])[0] + 1
      near.append(q - value_at <= 10)
  assert got == pytest.approx(np.mean(near)) and 0 < got < 1


def test_listops_root_rule_ignores_nested_lists():
  from experiments.grids import listops
  from zoo.data.listops import TOKEN
  ids = lambda text: [TOKEN[t] for t in text.split()]
  assert listops.root_rule(ids("[MAX 3 [MIN 9 1 ] 5 ]")) == 5
  assert listops.root_rule(ids("[SM 7 [MAX 9 ] 8 ]")) == 5
  assert listops.root_rule(ids("[MED [MAX 9 ] [MIN 1 ] ]")) == 0
