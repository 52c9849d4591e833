"""Blockwise softmax attention: the online-softmax (FlashAttention) form.

Queries and keys are cut into blocks; each query block runs over its key
blocks keeping a running max, normaliser and output, so no TxS matrix is ever
built. The backward pass (a `jax.custom_vjp`) recomputes each block's
probabilities from the saved logsumexp instead of storing them, so memory in
both passes grows linearly with length. Causal runs visit only the key blocks
on or below the diagonal. A bias callable is evaluated per visited block, and
parameters it closes over (a learned relative bias) get their gradients
through the same backward pass. Values equal the dense op's up to rounding.

On CPU, self-attention without a padding mask or bias runs the same
algorithm as one fused C++ kernel (`fused_cpu`), which keeps a block's
scores in cache between its two matmuls where the XLA form sends them
through memory; `implementation` chooses.

Shapes: B batch, T query length, S key length, H heads, G kv heads, R = H // G
queries per kv head, K head dim, N query blocks of Q rows, M key blocks of C
keys.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from zoo import registry
from zoo.attention.kernels import fused_cpu, placement
from zoo.attention.base import AttentionOp, group_queries

@registry.register("attention", "blockwise")
@dataclasses.dataclass(frozen=True)
class Blockwise(AttentionOp):
  """Softmax attention computed in query x key blocks with an online softmax
  and a recomputing backward pass: memory linear in length. `block_q` query
  rows and `block_k` keys per block (clipped to the lengths) in the XLA
  form; the defaults are sized for CPU caches. `implementation`: 'xla' (any
  device, mask and bias), 'fused' (the C++ kernel: CPU self-attention, no
  padding mask or bias, its own 128 x 256 blocks) or None: 'fused' where it
  applies, else 'xla' (with one warning if the kernel cannot be built)."""

  block_q: int = 256
  block_k: int = 512
  implementation: str | None = None

  def __post_init__(self):
    for name in ("block_q", "block_k"):
      if getattr(self, name) < 1:
        raise ValueError(f"attention blockwise({name}=...) must be >= 1; "
                         f"got {getattr(self, name)}")
    fused_cpu.check_implementation("blockwise", self.implementation)

  def attend(self, q, k, v, *, causal, mask, bias):
    if self._fused(q, k, mask, bias):
      def run(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, _):
        return fused_cpu.attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK,
                                   causal=causal)
      return placement.shard_heads(run, q, k, v).astype(q.dtype)
    b, t, h, d = q.shape
    s, g = k.shape[1], k.shape[2]
    bq, bk = min(self.block_q, t), min(self.block_k, s)
    n, m = -(-t // bq), -(-s // bk)
    # Queries as N x B x G x R x Q x K, keys and values as M x B x G x C x K.
    q_BxGxRxTxK = group_queries(q, g).transpose(0, 2, 3, 1, 4)
    q_BxGxRxTxK = _pad(q_BxGxRxTxK.astype(jnp.float32), 3, n * bq)
    q_NxBxGxRxQxK = q_BxGxRxTxK.reshape(b, g, h // g, n, bq, d).transpose(
        3, 0, 1, 2, 4, 5)
    k_MxBxGxCxK, v_MxBxGxCxK = (
        _pad(x.astype(jnp.float32).transpose(0, 2, 1, 3), 2, m * bk)
        .reshape(b, g, m, bk, d).transpose(2, 0, 1, 3, 4) for x in (k, v))
    valid_BxS = jnp.ones((b, s), bool) if mask is None else mask
    valid_MxBxC = _pad(valid_BxS, 1, m * bk).reshape(b, m, bk).transpose(
        1, 0, 2)

    spec = _Spec(t=t, s=s, bq=bq, bk=bk, n=n, m=m, causal=causal)
    if bias is None:
      bias_fn, consts = None, ()
    else:
      bias_fn, consts = jax.closure_convert(
          bias, jnp.zeros(bq, jnp.int32), jnp.zeros(bk, jnp.int32))
      consts = tuple(consts)
    out_NxBxGxRxQxK = _flash(spec, bias_fn, q_NxBxGxRxQxK, k_MxBxGxCxK,
                             v_MxBxGxCxK, valid_MxBxC, consts)
    out_BxTxHxK = out_NxBxGxRxQxK.transpose(1, 0, 4, 2, 3, 5).reshape(
        b, n * bq, h, d)[:, :t]
    return out_BxTxHxK.astype(q.dtype)

  def _fused(self, q, k, mask, bias) -> bool:
    """Whether this call runs the fused kernel (`fused_cpu.use`)."""
    return fused_cpu.use(
        "blockwise", self.implementation,
        "CPU self-attention without a padding mask or bias",
        (mask is not None and "a padding mask")
        or (bias is not None and "an additive bias")
        or (q.shape[1] != k.shape[1] and "q_len != kv_len"))


@dataclasses.dataclass(frozen=True)
class _Spec:
  """Static sizes: lengths, block sizes, block counts and causality."""

  t: int
  s: int
  bq: int
  bk: int
  n: int
  m: int
  causal: bool

  def key_block_ends(self):
    """Per query block, one past the last key block it can see."""
    if not self.causal:
      return np.full(self.n, self.m, np.int32)
    last_pos = self.s - self.t + np.minimum(
        (np.arange(self.n) + 1) * self.bq, self.t) - 1
    return np.clip(last_pos // self.bk + 1, 0, self.m).astype(np.int32)

  def query_block_starts(self):
    """Per key block, the first query block that can see it."""
    if not self.causal:
      return np.zeros(self.m, np.int32)
    first_t = np.arange(self.m) * self.bk - (self.s - self.t)
    return np.clip(first_t // self.bq, 0, self.n).astype(np.int32)


def _pad(x, axis, size):
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)


def _positions(spec, i, j):
  """Query positions of query block i and key positions of key block j."""
  return (spec.s - spec.t + i * spec.bq + jnp.arange(spec.bq),
          j * spec.bk + jnp.arange(spec.bk))


def _logits(spec, i, j, q_BxGxRxQxK, k_BxGxCxK, valid_BxC, bias_HxQxC):
  """Scaled, biased and masked logits of block pair (i, j), -inf where
  attention is not allowed: B x G x R x Q x C."""
  q_pos_Q, k_pos_C = _positions(spec, i, j)
  _, g, r, _, d = q_BxGxRxQxK.shape
  logits_BxGxRxQxC = jnp.einsum("bgrqd,bgcd->bgrqc",
                                q_BxGxRxQxK / np.sqrt(d), k_BxGxCxK)
  if bias_HxQxC is not None:
    logits_BxGxRxQxC += bias_HxQxC.astype(jnp.float32).reshape(
        g, r, spec.bq, spec.bk)
  allowed = valid_BxC[:, None, None, None, :]
  if spec.causal:
    allowed = allowed & (q_pos_Q[:, None] >= k_pos_C[None, :])
  return jnp.where(allowed, logits_BxGxRxQxC, -jnp.inf)


def _forward(spec, bias_fn, q_NxBxGxRxQxK, k_MxBxGxCxK, v_MxBxGxCxK,
             valid_MxBxC, consts):
  """Output N x B x G x R x Q x K and logsumexp N x B x G x R x Q (+inf for
  a query with no visible key)."""

  def query_block(_, xs):
    i, end, q_BxGxRxQxK = xs

    def key_block(j, carry):
      max_BxGxRxQ, sum_BxGxRxQ, acc_BxGxRxQxK = carry
      bias_HxQxC = None
      if bias_fn is not None:
        bias_HxQxC = bias_fn(*_positions(spec, i, j), *consts)
      logits_BxGxRxQxC = _logits(spec, i, j, q_BxGxRxQxK, k_MxBxGxCxK[j],
                                 valid_MxBxC[j], bias_HxQxC)
      new_max_BxGxRxQ = jnp.maximum(max_BxGxRxQ, logits_BxGxRxQxC.max(-1))
      safe_max_BxGxRxQ = jnp.where(new_max_BxGxRxQ == -jnp.inf, 0.0,
                                   new_max_BxGxRxQ)
      p_BxGxRxQxC = jnp.exp(logits_BxGxRxQxC - safe_max_BxGxRxQ[..., None])
      correction_BxGxRxQ = jnp.exp(max_BxGxRxQ - safe_max_BxGxRxQ)
      sum_BxGxRxQ = (sum_BxGxRxQ * correction_BxGxRxQ
                     + p_BxGxRxQxC.sum(-1))
      acc_BxGxRxQxK = (acc_BxGxRxQxK * correction_BxGxRxQ[..., None]
                       + jnp.einsum("bgrqc,bgcd->bgrqd", p_BxGxRxQxC,
                                    v_MxBxGxCxK[j]))
      return new_max_BxGxRxQ, sum_BxGxRxQ, acc_BxGxRxQxK

    stats_shape = q_BxGxRxQxK.shape[:-1]
    init = (jnp.full(stats_shape, -jnp.inf), jnp.zeros(stats_shape),
            jnp.zeros_like(q_BxGxRxQxK))
    max_BxGxRxQ, sum_BxGxRxQ, acc_BxGxRxQxK = jax.lax.fori_loop(
        0, end, key_block, init)
    seen_BxGxRxQ = sum_BxGxRxQ > 0
    safe_sum_BxGxRxQ = jnp.where(seen_BxGxRxQ, sum_BxGxRxQ, 1.0)
    out_BxGxRxQxK = jnp.where(seen_BxGxRxQ[..., None],
                              acc_BxGxRxQxK / safe_sum_BxGxRxQ[..., None], 0.0)
    lse_BxGxRxQ = jnp.where(seen_BxGxRxQ,
                            max_BxGxRxQ + jnp.log(safe_sum_BxGxRxQ), jnp.inf)
    return None, (out_BxGxRxQxK, lse_BxGxRxQ)

  xs = (jnp.arange(spec.n), jnp.asarray(spec.key_block_ends()), q_NxBxGxRxQxK)
  return jax.lax.scan(query_block, None, xs)[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _flash(spec, bias_fn, q, k, v, valid, consts):
  return _forward(spec, bias_fn, q, k, v, valid, consts)[0]


def _flash_fwd(spec, bias_fn, q, k, v, valid, consts):
  out, lse = _forward(spec, bias_fn, q, k, v, valid, consts)
  return out, (q, k, v, valid, consts, out, lse)


def _flash_bwd(spec, bias_fn, residuals, d_out_NxBxGxRxQxK):
  """FlashAttention-2 backward: key blocks outside, the query blocks that see
  them inside; probabilities recomputed from the saved logsumexp."""
  (q_NxBxGxRxQxK, k_MxBxGxCxK, v_MxBxGxCxK, valid_MxBxC, consts,
   out_NxBxGxRxQxK, lse_NxBxGxRxQ) = residuals
  delta_NxBxGxRxQ = jnp.sum(d_out_NxBxGxRxQxK * out_NxBxGxRxQxK, -1)
  scale = 1.0 / np.sqrt(q_NxBxGxRxQxK.shape[-1])

  def key_block(carry, xs):
    j, start, k_BxGxCxK, v_BxGxCxK, valid_BxC = xs

    def query_block(i, carry):
      d_k_BxGxCxK, d_v_BxGxCxK, d_q_NxBxGxRxQxK, d_consts = carry
      q_BxGxRxQxK = q_NxBxGxRxQxK[i]
      d_out_BxGxRxQxK = d_out_NxBxGxRxQxK[i]
      bias_HxQxC, bias_vjp = None, None
      if bias_fn is not None:
        bias_HxQxC, bias_vjp = jax.vjp(
            functools.partial(bias_fn, *_positions(spec, i, j)), *consts)
      logits_BxGxRxQxC = _logits(spec, i, j, q_BxGxRxQxK, k_BxGxCxK,
                                 valid_BxC, bias_HxQxC)
      p_BxGxRxQxC = jnp.exp(logits_BxGxRxQxC - lse_NxBxGxRxQ[i][..., None])
      d_v_BxGxCxK += jnp.einsum("bgrqc,bgrqd->bgcd", p_BxGxRxQxC,
                                d_out_BxGxRxQxK)
      d_p_BxGxRxQxC = jnp.einsum("bgrqd,bgcd->bgrqc", d_out_BxGxRxQxK,
                                 v_BxGxCxK)
      d_logits_BxGxRxQxC = p_BxGxRxQxC * (
          d_p_BxGxRxQxC - delta_NxBxGxRxQ[i][..., None])
      d_q_NxBxGxRxQxK = d_q_NxBxGxRxQxK.at[i].add(
          jnp.einsum("bgrqc,bgcd->bgrqd", d_logits_BxGxRxQxC, k_BxGxCxK)
          * scale)
      d_k_BxGxCxK += jnp.einsum("bgrqc,bgrqd->bgcd", d_logits_BxGxRxQxC,
                                q_BxGxRxQxK) * scale
      if consts:
        d_bias_HxQxC = d_logits_BxGxRxQxC.sum(0).reshape(bias_HxQxC.shape)
        d_consts = jax.tree.map(jnp.add, d_consts,
                                bias_vjp(d_bias_HxQxC.astype(bias_HxQxC.dtype)))
      return d_k_BxGxCxK, d_v_BxGxCxK, d_q_NxBxGxRxQxK, d_consts

    init = (jnp.zeros_like(k_BxGxCxK), jnp.zeros_like(v_BxGxCxK), *carry)
    d_k_BxGxCxK, d_v_BxGxCxK, *carry = jax.lax.fori_loop(
        start, spec.n, query_block, init)
    return tuple(carry), (d_k_BxGxCxK, d_v_BxGxCxK)

  init = (jnp.zeros_like(q_NxBxGxRxQxK), jax.tree.map(jnp.zeros_like, consts))
  xs = (jnp.arange(spec.m), jnp.asarray(spec.query_block_starts()),
        k_MxBxGxCxK, v_MxBxGxCxK, valid_MxBxC)
  (d_q, d_consts), (d_k, d_v) = jax.lax.scan(key_block, init, xs)
  return d_q, d_k, d_v, None, d_consts


_flash.defvjp(_flash_fwd, _flash_bwd)
