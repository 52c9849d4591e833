"""The fused CPU kernels (zoo/attention/kernels/fused_cpu.py) against
float64 numpy references: softmax attention and causal linear attention,
values and gradients over lengths and dims that need padding to 16, several
kernel blocks or chunks, grouped queries; and how the library is built and
cached."""

import os
import subprocess

import jax
import numpy as np
import pytest

from zoo.attention.kernels import fused_cpu

pytestmark = pytest.mark.skipif(fused_cpu.unavailable() is not None,
                                reason=str(fused_cpu.unavailable()))


def reference(q, k, v, d_out, causal):
  """Softmax attention and its gradients in float64 numpy, written out."""
  q, k, v, d_out = (np.asarray(x, np.float64) for x in (q, k, v, d_out))
  t, h, g, d = q.shape[1], q.shape[2], k.shape[2], q.shape[3]
  k_h, v_h = (np.repeat(x, h // g, axis=2) for x in (k, v))
  s = np.einsum("bthd,bshd->bhts", q, k_h) / np.sqrt(d)
  if causal:
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  out = np.einsum("bhts,bshd->bthd", p, v_h)
  dp = np.einsum("bthd,bshd->bhts", d_out, v_h)
  ds = p * (dp - (dp * p).sum(-1, keepdims=True)) / np.sqrt(d)
  dq = np.einsum("bhts,bshd->bthd", ds, k_h)
  dk_h = np.einsum("bhts,bthd->bshd", ds, q)
  dv_h = np.einsum("bhts,bthd->bshd", p, d_out)
  fold = lambda x: x.reshape(*x.shape[:2], g, h // g, d).sum(3)
  return out, dq, fold(dk_h), fold(dv_h)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("b,t,h,g,d", [(2, 13, 4, 2, 24), (1, 300, 2, 1, 64),
                                       (2, 48, 2, 2, 8)])
def test_matches_numpy(b, t, h, g, d, causal):
  # 300 positions span three query blocks and two key blocks of the kernel.
  rng = np.random.default_rng(t + d)
  q = rng.standard_normal((b, t, h, d), np.float32)
  k, v = (rng.standard_normal((b, t, g, d), np.float32) for _ in "kv")
  d_out = rng.standard_normal((b, t, h, d), np.float32)
  out, vjp = jax.vjp(
      jax.jit(lambda q, k, v: fused_cpu.attention(q, k, v, causal=causal)),
      q, k, v)
  got = (out, *vjp(d_out))
  for name, x, want in zip(("out", "dq", "dk", "dv"), got,
                           reference(q, k, v, d_out, causal)):
    np.testing.assert_allclose(x, want, atol=2e-5, rtol=1e-4, err_msg=name)


def test_vmap_runs_each_slice():
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal((3, 1, 20, 2, 16), np.float32)
             for _ in "qkv")
  got = jax.vmap(lambda q, k, v: fused_cpu.attention(q, k, v, causal=True))(
      q, k, v)
  for i in range(3):
    np.testing.assert_allclose(
        got[i], reference(q[i], k[i], v[i], q[i], True)[0], atol=2e-5)


def linear_reference(phi_q, phi_k, shift, v, d_num, d_den):
  """Causal weighted linear attention (num, den) and its gradients in
  float64 numpy, written out: a_ts = exp(shift_s - M_t) phi_q_t . phi_k_s
  for s <= t, M_t the running maximum of the shifts."""
  phi_q, phi_k, shift, v = (np.asarray(x, np.float64)
                            for x in (phi_q, phi_k, shift, v))
  b, t, h, _ = phi_q.shape
  g = phi_k.shape[2]
  phi_k_h, v_h, shift_h = (np.repeat(x, h // g, axis=2)
                           for x in (phi_k, v, shift))
  top = np.maximum.accumulate(shift_h, axis=1)
  w = np.exp(shift_h[:, None] - top[:, :, None])  # b t s h
  w *= np.tril(np.ones((t, t)))[None, :, :, None]
  a = np.einsum("bthf,bshf->btsh", phi_q, phi_k_h) * w
  num, den = np.einsum("btsh,bshk->bthk", a, v_h), a.sum(2)
  da = (np.einsum("bthk,bshk->btsh", d_num, v_h) + d_den[:, :, None]) * w
  d_phi_q = np.einsum("btsh,bshf->bthf", da, phi_k_h)
  d_phi_k = np.einsum("btsh,bthf->bshf", da, phi_q)
  d_v = np.einsum("btsh,bthk->bshk", a, d_num)
  fold = lambda x: x.reshape(b, t, g, h // g, -1).sum(3)
  return num, den, d_phi_q, fold(d_phi_k), fold(d_v)


@pytest.mark.parametrize("shifted", [True, False])
@pytest.mark.parametrize("b,t,h,g,f,k", [(2, 13, 4, 2, 24, 20),
                                         (1, 300, 2, 1, 64, 64),
                                         (2, 130, 4, 4, 16, 8)])
def test_causal_linear_matches_numpy(b, t, h, g, f, k, shifted):
  # 300 and 130 positions span several 64-key chunks, the last one partial.
  rng = np.random.default_rng(t + f)
  phi_q = rng.uniform(0, 1, (b, t, h, f)).astype(np.float32)
  phi_k = rng.uniform(0, 1, (b, t, g, f)).astype(np.float32)
  shift = (3 * rng.standard_normal((b, t, g)) * shifted).astype(np.float32)
  v = rng.standard_normal((b, t, g, k)).astype(np.float32)
  d_num = rng.standard_normal((b, t, h, k)).astype(np.float32)
  d_den = rng.standard_normal((b, t, h)).astype(np.float32)
  (num, den), vjp = jax.vjp(jax.jit(
      lambda q, kk, vv: fused_cpu.causal_linear(q, kk, shift, vv)),
                            phi_q, phi_k, v)
  got = (num, den, *vjp((d_num, d_den)))
  names = ("num", "den", "d_phi_q", "d_phi_k", "d_v")
  for name, x, want in zip(names, got, linear_reference(
      phi_q, phi_k, shift, v, d_num, d_den)):
    np.testing.assert_allclose(x, want, atol=2e-5 * np.abs(want).max(),
                               rtol=1e-4, err_msg=name)


@pytest.mark.slow  # builds the library afresh
def test_library_is_cached_by_key(tmp_path, monkeypatch):
  monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path))
  first = fused_cpu._build()
  built_at = first.stat().st_mtime_ns
  assert first.parent == tmp_path and first.suffix == ".so"
  assert fused_cpu._build() == first
  assert first.stat().st_mtime_ns == built_at  # reused, not rebuilt
  assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no scratch


def test_missing_compiler_is_one_line(tmp_path, monkeypatch):
  monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path))
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
  reason = fused_cpu._load.__wrapped__()
  assert reason.startswith("the fused CPU attention kernel could not be "
                           "built: ") and "no-such-compiler" in reason
  assert "\n" not in reason


def test_compile_error_reports_the_compiler_line(tmp_path, monkeypatch):
  bad = tmp_path / "bad.cc"
  bad.write_text("this is not C++\n")
  monkeypatch.setattr(fused_cpu, "SOURCE", bad)
  monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "cache"))
  with pytest.raises(subprocess.CalledProcessError):
    fused_cpu._build()
  reason = fused_cpu._load.__wrapped__()
  assert "bad.cc" in reason and "\n" not in reason
  assert not os.listdir(tmp_path / "cache")  # nothing half-written is kept
