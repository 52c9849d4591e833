import subprocess
import sys

import pytest

from zoo import registry


def test_parse_name_and_keywords():
  assert registry.parse("standard") == ("standard", {})
  assert registry.parse(" xla(implementation='cudnn') ") == (
      "xla", {"implementation": "cudnn"})
  assert registry.parse("t(a=1, b=-2.5, c=(1, 2), d=None, e=True)") == (
      "t", {"a": 1, "b": -2.5, "c": (1, 2), "d": None, "e": True})


@pytest.mark.parametrize("spec", ["local(128)", "local(window=x)", "a.b",
                                  "local(window=1", "f(**k)", "1+2"])
def test_parse_rejects_malformed_specs(spec):
  with pytest.raises(ValueError, match="spec"):
    registry.parse(spec)


def test_names_are_sorted_and_cover_core_parts():
  attention = registry.names("attention")
  assert attention == sorted(attention)
  assert {"standard", "xla"} <= set(attention)
  assert {"none", "sinusoidal", "learned"} <= set(registry.names("position"))
  assert {"lm", "classifier"} <= set(registry.names("model"))
  assert "mqar" in registry.names("task")


def test_unknown_name_lists_the_valid_ones():
  with pytest.raises(ValueError, match=r"unknown attention 'nope'; valid: .*"
                     r"standard.*xla"):
    registry.build("attention", "nope")


def test_unknown_kind():
  with pytest.raises(ValueError, match="unknown kind 'bogus'; valid: attention"):
    registry.names("bogus")


def test_unknown_keyword_lists_the_valid_ones():
  with pytest.raises(ValueError, match="no argument 'window'; valid: "
                     "implementation"):
    registry.build("attention", "xla(window=3)")
  with pytest.raises(ValueError, match="no argument 'x'; valid: none"):
    registry.build("attention", "standard(x=1)")


def test_wrong_type_names_the_expected_type():
  with pytest.raises(ValueError, match=r"max_len=...\) must be int \| None"):
    registry.validate("position", "learned(max_len='long')")
  with pytest.raises(ValueError, match="must be int"):
    registry.validate("task", "mqar(num_pairs=2.5)")


def test_int_is_accepted_for_float():
  assert registry.validate("position", "sinusoidal(max_scale=100)")[1] == {
      "max_scale": 100}


def test_build_passes_spec_arguments():
  op = registry.build("attention", "xla(implementation='xla')")
  assert op.implementation == "xla"
  with pytest.raises(ValueError, match="None, 'xla' or 'cudnn'"):
    registry.build("attention", "xla(implementation='tpu')")


def test_params_lists_defaults_not_context():
  params = {p.name: p.default for p in registry.params("position", "learned")}
  assert params == {"max_len": None}  # embed_dim, seq_len, rngs are context


def test_command_line_listing():
  out = subprocess.run([sys.executable, "-m", "zoo.registry"], check=True,
                       capture_output=True, text=True).stdout
  assert "[attention]" in out and "[position]" in out and "[task]" in out
  assert "mqar(num_pairs: int = 8" in out
  assert "[attention x position]" in out
