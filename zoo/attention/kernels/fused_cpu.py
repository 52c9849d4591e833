"""Fused attention kernels for CPU, in C++ (fused_cpu.cc), called through
XLA FFI, each with its own backward pass.

Why kernels: an XLA:CPU program cannot keep a block of scores in cache
between the matmuls around it, so every block goes through memory.
- `attention`, softmax attention for `blockwise`: as XLA every block's
  scores make a round trip through memory between its two matmuls. The
  kernel is FlashAttention-2
  (online softmax forward, recomputing backward from the saved logsumexp),
  so memory stays linear in length.
- `causal_linear`, causal linear attention for `linear`: the chunked XLA
  form's arrays leave the L2 cache as length grows, so its time grows
  faster than length. The kernel runs the same chunks with each chunk's scores and
  the running state in cache.

The library is compiled on first use with the machine's C++ compiler (`CXX`,
else `c++`) and cached under `ZOO_CACHE_DIR` (default
~/.cache/zoo), keyed by the source, the compiler, jaxlib's version and the
CPU's features (it is built for this CPU with -march=native). Where it
cannot be built, `unavailable()` says why and callers run XLA instead
(`use` decides, for the ops' `implementation` argument).

Shapes: B batch, T length (Tp padded to 16), H heads, G kv heads, K head dim
(Kp padded to 16), F features.
"""

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from zoo.attention.kernels import placement

SOURCE = pathlib.Path(__file__).with_name("fused_cpu.cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC",
         "-pthread", "-w")
_TARGETS = {"zoo_attention_forward": "ZooAttentionForward",
            "zoo_attention_backward": "ZooAttentionBackward",
            "zoo_linear_forward": "ZooLinearForward",
            "zoo_linear_backward": "ZooLinearBackward"}
_LANES = 16  # the kernel's vector width in floats: T and K are padded to it
# The `implementation` argument of the ops with a fused CPU kernel.
IMPLEMENTATIONS = (None, "xla", "fused")


def unavailable() -> str | None:
  """None when the kernel is built and registered with XLA; otherwise one
  line saying why not (the first line of the compiler's error)."""
  return _load()


def check_implementation(op: str, implementation) -> None:
  """Refuses an `implementation` argument outside IMPLEMENTATIONS."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"attention {op}(implementation=...) must be one of "
        f"{', '.join(map(repr, IMPLEMENTATIONS))}; got {implementation!r}")


def use(op: str, implementation, takes: str, why: str | None) -> bool:
  """Whether a call of attention `op` runs its fused kernel. `takes` says
  which calls the kernel runs, `why` what in this call it cannot take (None
  or '' when nothing). None runs the kernel where it applies (one warning
  and XLA where it cannot be built); 'xla' never; 'fused' always, refusing
  before any compute a call or machine it cannot run."""
  if implementation == "xla":
    return False
  backend = jax.default_backend()
  why = why or (backend != "cpu" and f"the {backend} backend")
  if why and implementation == "fused":
    raise ValueError(
        f"attention {op}(implementation='fused') runs {takes}; this call "
        f"has {why} (use implementation=None or 'xla')")
  if why:
    return False
  reason = unavailable()
  if reason and implementation == "fused":
    raise ValueError(f"attention {op}(implementation='fused'): {reason}")
  if reason:
    placement.warn_once(f"attention {op}: {reason}; running the XLA form")
  return not reason


def attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, *, causal: bool):
  """Softmax self-attention with scale 1/sqrt(K), float32, by the kernel.
  Query t sees key s when s <= t (causal) or always; no mask or bias (the
  callers run XLA for those). Call only where `unavailable()` is None."""
  b, t, h, d = q_BxTxHxK.shape
  tp, dp = -(-t // _LANES) * _LANES, -(-d // _LANES) * _LANES
  pad = ((0, 0), (0, tp - t), (0, 0), (0, dp - d))
  q, k, v = (jnp.pad(x.astype(jnp.float32), pad)
             for x in (q_BxTxHxK, k_BxTxGxK, v_BxTxGxK))
  out_BxTpxHxKp = _fused(q, k, v, bool(causal), t, 1.0 / float(np.sqrt(d)))
  return out_BxTpxHxKp[:, :t, :, :d]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _fused(q, k, v, causal, valid, scale):
  return _forward(q, k, v, causal, valid, scale)[0]


def _forward(q_BxTpxHxKp, k, v, causal, valid, scale):
  b, tp, h, _ = q_BxTpxHxKp.shape
  out_shapes = (jax.ShapeDtypeStruct(q_BxTpxHxKp.shape, jnp.float32),
                jax.ShapeDtypeStruct((b, h, tp), jnp.float32))
  return jax.ffi.ffi_call("zoo_attention_forward", out_shapes,
                          vmap_method="sequential")(
                              q_BxTpxHxKp, k, v, **_attributes(causal, valid,
                                                               scale))


def _fused_fwd(q, k, v, causal, valid, scale):
  out, lse_BxHxTp = _forward(q, k, v, causal, valid, scale)
  return out, (q, k, v, out, lse_BxHxTp)


def _fused_bwd(causal, valid, scale, residuals, d_out):
  q, k, v, _, _ = residuals
  shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
  return jax.ffi.ffi_call("zoo_attention_backward", shapes,
                          vmap_method="sequential")(
                              *residuals, d_out.astype(jnp.float32),
                              **_attributes(causal, valid, scale))


_fused.defvjp(_fused_fwd, _fused_bwd)


def causal_linear(phi_q_BxTxHxF, phi_k_BxTxGxF, shift_BxTxG, v_BxTxGxK):
  """Causal linear attention by the kernel, unnormalised: (num BxTxHxK,
  den BxTxH) = sum over keys s <= t of exp(shift_s - M_t) (phi_q_t .
  phi_k_s) (v_s, 1), with M_t = max_{s <= t} shift_s (see linear.py's
  FAVOR+ stabiliser; zeros for elu features). float32, T == S, no mask;
  `shift` gets no gradient (the callers stop it). Call only where
  `unavailable()` is None."""
  b, t, h, f = phi_q_BxTxHxF.shape
  k = v_BxTxGxK.shape[-1]
  tp, fp, vp = (-(-x // _LANES) * _LANES for x in (t, f, k + 1))
  pad_t = lambda x: jnp.pad(x, [(0, 0), (0, tp - t)] + [(0, 0)] *
                            (x.ndim - 2))
  phi_q, phi_k = (pad_t(jnp.pad(x, [(0, 0)] * 3 + [(0, fp - f)]))
                  for x in (phi_q_BxTxHxF, phi_k_BxTxGxF))
  # Values with a column of ones, whose output is the normaliser.
  v_BxTxGxV = pad_t(jnp.concatenate(
      [v_BxTxGxK, jnp.ones_like(v_BxTxGxK[..., :1])], -1))
  v_BxTxGxV = jnp.pad(v_BxTxGxV, [(0, 0)] * 3 + [(0, vp - k - 1)])
  y_BxTpxHxV = _linear(phi_q, phi_k, pad_t(shift_BxTxG), v_BxTxGxV)
  return y_BxTpxHxV[:, :t, :, :k], y_BxTpxHxV[:, :t, :, k]


@jax.custom_vjp
def _linear(phi_q, phi_k, shift, v):
  return _linear_fwd(phi_q, phi_k, shift, v)[0]


def _linear_fwd(phi_q_BxTxHxF, phi_k, shift, v_BxTxGxV):
  b, t, h, _ = phi_q_BxTxHxF.shape
  y = jax.ffi.ffi_call(
      "zoo_linear_forward",
      jax.ShapeDtypeStruct((b, t, h, v_BxTxGxV.shape[-1]), jnp.float32),
      vmap_method="sequential")(phi_q_BxTxHxF, phi_k, shift, v_BxTxGxV)
  return y, (phi_q_BxTxHxF, phi_k, shift, v_BxTxGxV)


def _linear_bwd(residuals, d_y):
  phi_q, phi_k, shift, v = residuals
  shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32)
                 for x in (phi_q, phi_k, v))
  d_phi_q, d_phi_k, d_v = jax.ffi.ffi_call(
      "zoo_linear_backward", shapes, vmap_method="sequential")(
          *residuals, d_y.astype(jnp.float32))
  return d_phi_q, d_phi_k, jnp.zeros_like(shift), d_v


_linear.defvjp(_linear_fwd, _linear_bwd)


def _attributes(causal, valid, scale):
  return dict(causal=np.bool_(causal), valid=np.int64(valid),
              scale=np.float32(scale))


@functools.cache
def _load() -> str | None:
  try:
    library = ctypes.cdll.LoadLibrary(str(_build()))
  except (OSError, subprocess.SubprocessError) as e:
    return f"the fused CPU attention kernel could not be built: {_first_line(e)}"
  for target, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(
        target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
  return None


def _build() -> pathlib.Path:
  """The compiled library's path, compiling it when the cache lacks it (to a
  temporary name, then renamed: concurrent processes never see half a
  file)."""
  compiler = os.environ.get("CXX", "c++")
  key = hashlib.sha256(b"\0".join([
      SOURCE.read_bytes(), compiler.encode(), " ".join(FLAGS).encode(),
      jaxlib.__version__.encode(), _cpu_features().encode()])).hexdigest()
  cache = pathlib.Path(os.environ.get("ZOO_CACHE_DIR")
                       or pathlib.Path.home() / ".cache" / "zoo")
  library = cache / f"fused_cpu-{key[:16]}.so"
  if library.exists():
    return library
  cache.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=cache) as scratch:
    built = pathlib.Path(scratch) / library.name
    subprocess.run([compiler, *FLAGS, "-isystem", jax.ffi.include_dir(),
                    str(SOURCE), "-o", str(built)],
                   check=True, capture_output=True, text=True, timeout=600)
    os.replace(built, library)
  return library


def _cpu_features() -> str:
  """What -march=native depends on: the CPU's flags where Linux lists them."""
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith(("flags", "Features")):
        return line
  except OSError:
    pass
  return platform.machine() + platform.processor()


def _first_line(error: Exception) -> str:
  stderr = getattr(error, "stderr", None)
  text = stderr.strip() if stderr and stderr.strip() else str(error)
  return text.splitlines()[0]
