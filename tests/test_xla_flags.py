"""zoo's XLA defaults: added to XLA_FLAGS by an explicit `apply()`, never
over the user's; importing zoo leaves XLA_FLAGS alone."""

import os
import subprocess
import sys

from zoo import xla_flags

DEFAULT = "--xla_cpu_experimental_ynn_fusion_type=-reduce"


def test_defaults_are_added_beside_other_flags(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  xla_flags.apply()
  assert os.environ["XLA_FLAGS"].split() == [
      "--xla_force_host_platform_device_count=8", DEFAULT]


def test_a_flag_the_user_set_is_kept(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
  xla_flags.apply()
  assert os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type="


def test_set_when_unset(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  xla_flags.apply()
  assert os.environ["XLA_FLAGS"] == DEFAULT


def test_importing_zoo_changes_no_flags():
  code = ("import os, zoo, zoo.attention, zoo.train; "
          "print(os.environ.get('XLA_FLAGS'))")
  for flags in (None, "--xla_force_host_platform_device_count=2"):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if flags:
      env["XLA_FLAGS"] = flags
    out = subprocess.run([sys.executable, "-c", code], env=env,
                         capture_output=True, text=True, check=True,
                         timeout=120)
    assert out.stdout.strip() == str(flags)


def test_this_session_compiles_like_the_trainer():
  """conftest applies the defaults (or keeps the user's), as zoo.train's
  main does."""
  assert "--xla_cpu_experimental_ynn_fusion_type=" in os.environ["XLA_FLAGS"]
