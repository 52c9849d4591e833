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


def test_stack_listing_gives_each_layer_its_budget(capsys):
  registry.main(["gla;local(window=16)", "--num_layers=4", "--length=64",
                 "--kv_heads=2", "--head_dim=8"])
  out = capsys.readouterr().out
  rows = [line.split() for line in out.splitlines()[2:6]]
  # Layer, spec, keys per query (causal, length 64), state floats:
  # gla holds G*K*V = 2*8*8; a 16-key ring holds 2*G*K*16.
  assert [r[1] for r in rows] == ["gla", "local(window=16)"] * 2
  assert [int(r[-1]) for r in rows] == [128, 512] * 2
  assert float(rows[0][2]) == 32.5  # (1 + ... + 64) / 64, every key seen
  assert "decode state 1280 floats per batch row (320 per layer)" in out


def test_stack_listing_refuses_a_stack_that_does_not_divide_the_layers():
  with pytest.raises(SystemExit) as e:
    registry.main(["gla;gla;standard", "--num_layers=4"])
  assert e.value.code == 2
