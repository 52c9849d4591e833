"""zoo's XLA defaults: added to XLA_FLAGS on import, never over the user's."""

import os
import subprocess
import sys

from zoo import xla_flags


def test_defaults_are_added_beside_other_flags(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  xla_flags.set_defaults()
  flags = os.environ["XLA_FLAGS"].split()
  assert flags[0] == "--xla_force_host_platform_device_count=8"
  assert "--xla_cpu_experimental_ynn_fusion_type=-reduce" in flags


def test_a_flag_the_user_set_is_kept(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
  xla_flags.set_defaults()
  assert os.environ["XLA_FLAGS"] == (
      "--xla_cpu_experimental_ynn_fusion_type=")


def test_set_when_unset(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  xla_flags.set_defaults()
  assert os.environ["XLA_FLAGS"] == (
      "--xla_cpu_experimental_ynn_fusion_type=-reduce")


def test_importing_zoo_sets_them_before_jax_starts():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run(
      [sys.executable, "-c", "import os, zoo; print(os.environ['XLA_FLAGS'])"],
      env=env, capture_output=True, text=True, check=True, timeout=120)
  assert out.stdout.strip() == "--xla_cpu_experimental_ynn_fusion_type=-reduce"
