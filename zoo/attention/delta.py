"""The delta rule: a recurrence over a per-kv-head state S (K x V),

    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,
    o_t = S_t^T q_t,

with a_t = exp(g_t) from a log forget gate g_t <= 0 (Gated DeltaNet, Yang
et al. 2025) or a_t = 1 (DeltaNet, Schlag et al. 2021). Each step writes
v_t at key k_t, replacing a fraction beta_t of what the state read there.
Grouped kv heads: each query head reads its kv head's state.

Three forms, as flash-linear-attention keeps them:
- `reference`: the recurrence step by step (a lax.scan over time);
- `chunked`, for training: Yang et al. 2024's parallel form. Within a chunk
  of C positions, with b the cumulative log gate and Gamma_ts =
  exp(b_t - b_s) for s <= t, the new values u_t = beta_t (v_t - (a_t
  S_{t-1})^T k_t), which make S_t = a_t S_{t-1} + k_t u_t^T, solve a unit
  lower-triangular system from the incoming state S,

      (I + A) U' = diag(beta) (V - (K * exp(b)) S),
      A = strict_tril(diag(beta) (K K^T * Gamma)),

  so with T = (I + A)^-1 diag(beta), W = T (K * exp(b)) and U = T V
  (computed for every chunk at once), U' = U - W S, and

      O = (Q * exp(b)) S + tril(Q K^T * Gamma) U',
      S_next = exp(b_C) S + (K * exp(b_C - b))^T U'.

  Only these last products run in the lax.scan over chunks that carries S.
  Every exponent is a difference b_t - b_s with s <= t, or b itself, so
  none is positive.
- `step`: one step of the recurrence, for decoding.

The triangular inverse is computed without LAPACK (XLA:CPU in jax 0.10 can
deadlock a program holding several LAPACK calls on 2 cores): forward
elimination on 16 x 16 diagonal blocks, merged by matmuls
(`unit_lower_inverse`).

Shapes: B batch, T length, N chunks, C chunk length, H query heads, G kv
heads, R = H / G, K key dim, V value dim.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from zoo.attention.base import AttentionOp

CHUNK = 64
# Rows eliminated at once; larger triangles are merged from these blocks by
# matmuls.
_BLOCK = 16


def step(state_BxGxKxV, q_BxHxK, k_BxGxK, v_BxGxV, beta_BxG, g_BxG=None):
  """(out_BxHxV, state): one step of the recurrence (fp32)."""
  b, h, d = q_BxHxK.shape
  g = k_BxGxK.shape[1]
  s_BxGxKxV = state_BxGxKxV
  if g_BxG is not None:
    s_BxGxKxV = s_BxGxKxV * jnp.exp(g_BxG.astype(jnp.float32))[..., None,
                                                                None]
  k_BxGxK = k_BxGxK.astype(jnp.float32)
  read_BxGxV = jnp.einsum("bgk,bgkv->bgv", k_BxGxK, s_BxGxKxV)
  new_BxGxV = beta_BxG.astype(jnp.float32)[..., None] * (
      v_BxGxV.astype(jnp.float32) - read_BxGxV)
  s_BxGxKxV = s_BxGxKxV + jnp.einsum("bgk,bgv->bgkv", k_BxGxK, new_BxGxV)
  out_BxGxRxV = jnp.einsum("bgrk,bgkv->bgrv", q_BxHxK.reshape(
      b, g, h // g, d).astype(jnp.float32), s_BxGxKxV)
  return out_BxGxRxV.reshape(b, h, -1), s_BxGxKxV


def reference(q_BxTxHxK, k_BxTxGxK, v_BxTxGxV, beta_BxTxG, g_BxTxG=None,
              state_BxGxKxV=None):
  """(out_BxTxHxV, final state): the recurrence, one `step` per position."""
  b, g, d, e = (q_BxTxHxK.shape[0], k_BxTxGxK.shape[2], k_BxTxGxK.shape[3],
                v_BxTxGxV.shape[3])
  if state_BxGxKxV is None:
    state_BxGxKxV = jnp.zeros((b, g, d, e), jnp.float32)

  def body(state, xs):
    out, state = step(state, *xs)
    return state, out

  xs = [q_BxTxHxK, k_BxTxGxK, v_BxTxGxV, beta_BxTxG] + (
      [] if g_BxTxG is None else [g_BxTxG])
  final, out_TxBxHxV = jax.lax.scan(
      body, state_BxGxKxV, [jnp.moveaxis(x, 1, 0) for x in xs])
  return jnp.moveaxis(out_TxBxHxV, 0, 1), final


def chunked(q_BxTxHxK, k_BxTxGxK, v_BxTxGxV, beta_BxTxG, g_BxTxG=None,
            state_BxGxKxV=None, *, chunk: int = CHUNK):
  """(out_BxTxHxV, final state): the recurrence computed `chunk` positions
  at a time (see the module docstring), fp32 whatever the inputs' dtype.
  The last chunk is padded with keys of beta 0 and gate 0, which leave the
  state as it is."""
  b, t, h, d = q_BxTxHxK.shape
  g, e = k_BxTxGxK.shape[2], v_BxTxGxV.shape[3]
  r = h // g
  c = min(chunk, t)
  n = -(-t // c)
  # The parallel products run batched over L = N x B x G on one axis
  # (XLA:CPU's batched matmuls run faster over one batch axis than three);
  # the scan over chunks sees M = B x G.
  l, m = n * b * g, b * g

  def split(x_BxTxGx_):
    """BxTxGx... -> LxCx... in fp32, T padded to N x C with zeros."""
    x = x_BxTxGx_.astype(jnp.float32)
    x = jnp.pad(x, [(0, 0), (0, n * c - t)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(b, n, c, *x.shape[2:])
    x = jnp.moveaxis(jnp.moveaxis(x, 1, 0), 2, 3)
    return x.reshape(l, *x.shape[3:])

  k_LxCxK, v_LxCxV, beta_LxC = (split(k_BxTxGxK), split(v_BxTxGxV),
                                split(beta_BxTxG))
  # Query rows of a kv head: its R heads' chunks stacked, Q = R x C rows.
  q_LxQxK = jnp.swapaxes(split(q_BxTxHxK.reshape(b, t, g, r, d)), 1,
                         2).reshape(l, r * c, d)
  strict_CxC = np.tril(np.ones((c, c), bool), -1)
  causal_CxC = np.tril(np.ones((c, c), bool))
  kk_LxCxC = jnp.einsum("lck,lek->lce", k_LxCxK, k_LxCxK)
  p_LxRxCxC = jnp.einsum("lqk,lek->lqe", q_LxQxK, k_LxCxK).reshape(
      l, r, c, c)
  if g_BxTxG is None:
    a_LxCxC = jnp.where(strict_CxC, beta_LxC[..., None] * kk_LxCxC, 0.0)
    p_LxRxCxC = jnp.where(causal_CxC, p_LxRxCxC, 0.0)
    k_in_LxCxK, q_in_LxQxK, k_out_LxCxK, last_L = (k_LxCxK, q_LxQxK,
                                                   k_LxCxK, None)
  else:
    # Cumulative sums as a matmul: jnp.cumsum's reduce-window, fused into
    # its consumers, was recomputed for every element of Gamma.
    b_LxC = split(g_BxTxG) @ np.triu(np.ones((c, c), np.float32))
    gamma_LxCxC = jnp.exp(jnp.where(
        causal_CxC, b_LxC[:, :, None] - b_LxC[:, None, :], -jnp.inf))
    a_LxCxC = jnp.where(strict_CxC, beta_LxC[..., None] * kk_LxCxC
                        * gamma_LxCxC, 0.0)
    p_LxRxCxC = p_LxRxCxC * gamma_LxCxC[:, None]
    k_in_LxCxK = k_LxCxK * jnp.exp(b_LxC)[..., None]
    q_in_LxQxK = (q_LxQxK.reshape(l, r, c, d)
                  * jnp.exp(b_LxC)[:, None, :, None]).reshape(l, r * c, d)
    k_out_LxCxK = k_LxCxK * jnp.exp(b_LxC[:, -1:] - b_LxC)[..., None]
    last_L = jnp.exp(b_LxC[:, -1])
  t_LxCxC = unit_lower_inverse(a_LxCxC) * beta_LxC[:, None, :]
  w_LxCxK = t_LxCxC @ k_in_LxCxK
  u_LxCxV = t_LxCxC @ v_LxCxV

  def body(s_MxKxV, xs):
    w_MxCxK, u_MxCxV, k_MxCxK, last_M = xs
    u_MxCxV = u_MxCxV - w_MxCxK @ s_MxKxV
    decayed = s_MxKxV if last_M is None else s_MxKxV * last_M[:, None, None]
    return decayed + jnp.swapaxes(k_MxCxK, 1, 2) @ u_MxCxV, (s_MxKxV,
                                                             u_MxCxV)

  by_chunk = lambda x: None if x is None else x.reshape(n, m, *x.shape[1:])
  s_MxKxV = (jnp.zeros((m, d, e), jnp.float32) if state_BxGxKxV is None
             else state_BxGxKxV.astype(jnp.float32).reshape(m, d, e))
  final_MxKxV, (s_NxMxKxV, u_NxMxCxV) = jax.lax.scan(
      body, s_MxKxV, tuple(map(by_chunk, (w_LxCxK, u_LxCxV, k_out_LxCxK,
                                          last_L))))
  out_LxQxV = (q_in_LxQxK @ s_NxMxKxV.reshape(l, d, e)
               + p_LxRxCxC.reshape(l, r * c, c) @ u_NxMxCxV.reshape(l, c, e))
  out = out_LxQxV.reshape(n, b, g, r, c, e).transpose(1, 0, 4, 2, 3, 5)
  return (out.reshape(b, n * c, h, e)[:, :t],
          final_MxKxV.reshape(b, g, d, e))


@jax.custom_vjp
def unit_lower_inverse(a_xCxC):
  """(I + A)^-1 for strictly lower-triangular A (its other entries must be
  zero), batched over leading axes: elimination on diagonal blocks of
  _BLOCK rows, then pairs of inverted blocks merged, [[X1, 0], [A21,
  X2]]^-1 = [[X1, 0], [-X2 A21 X1, X2]], until one remains (C padded with
  identity rows to _BLOCK x 2^m)."""
  *batch, c, _ = a_xCxC.shape
  size = min(c, _BLOCK)
  count = 1 << (-(-c // size) - 1).bit_length()
  p = size * count
  a_LxPxP = jnp.pad(a_xCxC.reshape(-1, c, c), [(0, 0), (0, p - c),
                                                (0, p - c)])
  l = a_LxPxP.shape[0]
  block = lambda i, j: a_LxPxP[:, i * size:(i + 1) * size,
                               j * size:(j + 1) * size]
  x_LxMxSxS = _eliminate(jnp.stack(
      [block(i, i) for i in range(count)], 1).reshape(-1, size, size)
                         ).reshape(l, count, size, size)
  while count > 1:
    pairs = (l * count // 2, size, size)
    below = jnp.stack([block(i + 1, i) for i in range(0, count, 2)],
                      1).reshape(pairs)
    x1, x2 = (x_LxMxSxS[:, i::2].reshape(pairs) for i in (0, 1))
    x21 = -(x2 @ below @ x1)
    x_LxMxSxS = jnp.concatenate([
        jnp.concatenate([x1, jnp.zeros_like(x1)], -1),
        jnp.concatenate([x21, x2], -1)], -2).reshape(l, count // 2, 2 * size,
                                                     2 * size)
    size, count = 2 * size, count // 2
  return x_LxMxSxS[:, 0, :c, :c].reshape(*batch, c, c)


def _eliminate(a_LxSxS):
  """(I + A)^-1 by forward elimination, a column at a time: once row j is
  final, A_ij row_j is taken from every row i > j."""
  s = a_LxSxS.shape[-1]
  x_LxSxS = jnp.broadcast_to(jnp.eye(s, dtype=a_LxSxS.dtype), a_LxSxS.shape)
  for j in range(s - 1):
    x_LxSxS = x_LxSxS - a_LxSxS[:, :, j, None] * x_LxSxS[:, j, None, :]
  return x_LxSxS


def _inverse_forward(a_xCxC):
  x_xCxC = unit_lower_inverse(a_xCxC)
  return x_xCxC, x_xCxC


def _inverse_backward(x_xCxC, dx_xCxC):
  """d(M^-1) = -M^-1 dM M^-1, so dA = -X^T dX X^T on the strict lower
  triangle (the entries A has)."""
  c = x_xCxC.shape[-1]
  xt_LxCxC = jnp.swapaxes(x_xCxC.reshape(-1, c, c), 1, 2)
  da_LxCxC = -(xt_LxCxC @ dx_xCxC.reshape(-1, c, c) @ xt_LxCxC)
  return (jnp.where(np.tril(np.ones((c, c), bool), -1), da_LxCxC,
                    0.0).reshape(x_xCxC.shape),)


unit_lower_inverse.defvjp(_inverse_forward, _inverse_backward)


@struct.dataclass
class DeltaState:
  """The delta rule's decode state: S per kv head (fp32)."""

  s_BxGxKxV: jax.Array


@dataclasses.dataclass(frozen=True)
class DeltaRule(AttentionOp):
  """Base of the delta-rule families: the op runs the recurrence on q, k,
  v and the gates its layer part made (`beta`, and `g` for gated forms:
  BxTxG, one per kv head), causal only. Training and prefill run the
  chunked form (`chunk` positions at a time), decoding the step.

  A padding mask makes a masked key leave the state as it is (beta 0 and
  gate 0 there), so the state after a padded sequence is that of its real
  keys; masked queries still get outputs, which the caller ignores.
  `short_conv`: the width of the layer part's short convolutions (0:
  none)."""

  chunk: int = CHUNK
  short_conv: int = 4

  positions = frozenset({"none", "absolute"})
  gates = ("beta",)
  any_value_dim = True

  def __post_init__(self):
    name = type(self).registry_name
    for key, low in (("chunk", 1), ("short_conv", 0)):
      if getattr(self, key) < low:
        raise ValueError(f"attention {name}({key}=...) must be >= {low}; "
                         f"got {getattr(self, key)}")

  def attend(self, q, k, v, *, causal, mask, bias, **gates):
    del bias  # refused by check (no bias position)
    name = type(self).registry_name
    if not causal:
      raise ValueError(f"attention {name} is causal only (a recurrence over "
                       "positions); use it in a decoder, not bidirectionally")
    beta, g = self._gates(gates)
    if mask is not None:
      beta = jnp.where(mask[..., None], beta, 0.0)
      g = None if g is None else jnp.where(mask[..., None], g, 0.0)
    # End-aligned: T > S leading queries see no key (zero state); S > T
    # keys before the first query only build its state.
    t, s = q.shape[1], k.shape[1]
    u = max(t, s)
    front = lambda x, n: jnp.pad(x, [(0, 0), (n, 0)] + [(0, 0)] * (
        x.ndim - 2))
    out, _ = chunked(front(q, u - t), *(front(x, u - s) for x in (k, v, beta)),
                     None if g is None else front(g, u - s),
                     chunk=self.chunk)
    return out[:, u - t:].astype(q.dtype)

  def _gates(self, gates):
    """(beta, g or None), each BxTxG: one gate per kv head."""
    for key, x in gates.items():
      if x.ndim != 3:
        raise ValueError(
            f"attention {type(self).registry_name}: gate {key} must be one "
            f"per kv head, [batch, len, kv_heads]; got {x.shape}")
    return gates["beta"], gates.get("g")

  def init_state(self, batch, capacity, kv_heads, head_dim, dtype):
    """S = 0 (fp32 whatever `dtype`); its size does not depend on
    `capacity`."""
    del capacity, dtype
    return DeltaState(jnp.zeros((batch, kv_heads, head_dim, head_dim),
                                jnp.float32))

  def state_size(self, length, kv_heads, head_dim):
    """G x K x V of the state, plus the short convolutions' last W - 1
    inputs of q, k and v (counted with as many query heads as kv heads:
    the op is not told the layer's query heads)."""
    del length
    conv = 3 * kv_heads * head_dim * max(self.short_conv - 1, 0)
    return kv_heads * head_dim * head_dim + conv

  def prefill(self, state, q_BxTxHxK, k_BxTxGxK, v_BxTxGxV, *, index, bias,
              **gates):
    """The chunked form from `state`: (out, final state)."""
    del index, bias
    beta, g = self._gates(gates)
    out, s_BxGxKxV = chunked(q_BxTxHxK, k_BxTxGxK, v_BxTxGxV, beta, g,
                             state.s_BxGxKxV, chunk=self.chunk)
    return out.astype(q_BxTxHxK.dtype), DeltaState(s_BxGxKxV)

  def decode_step(self, state, q_BxHxK, k_BxGxK, v_BxGxV, *, index, bias,
                  **gates):
    """One step of the recurrence."""
    del index, bias
    out, s_BxGxKxV = step(state.s_BxGxKxV, q_BxHxK, k_BxGxK, v_BxGxV,
                          gates["beta"], gates.get("g"))
    return out.astype(q_BxHxK.dtype), DeltaState(s_BxGxKxV)


def l2_normalise(x, eps: float = 1e-6):
  """x / |x| over the last axis (fp32 inside), as fla normalises q and k."""
  y = x.astype(jnp.float32)
  return (y * jax.lax.rsqrt(jnp.sum(y * y, -1, keepdims=True) + eps)
          ).astype(x.dtype)
