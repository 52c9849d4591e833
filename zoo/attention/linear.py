"""Linear attention: the softmax kernel exp(q.k) replaced by a feature map,
phi(q).phi(k), so attention reassociates to phi(q) (sum_s phi(k_s) v_s^T)
and costs T x F x K instead of T x S x K (Katharopoulos et al. 2020; Performer
FAVOR+, Choromanski et al. 2021).

Causal attention runs in chunks: the masked quadratic form inside a chunk,
and across chunks the state sum phi(k) v^T and normaliser sum phi(k) of all
earlier chunks, carried by a lax.scan over chunks, so time is linear in T.
On CPU, causal self-attention without a padding mask runs the same chunks
as one C++ kernel (`fused_cpu.causal_linear`) that keeps each chunk's
scores and the state in cache; the XLA form sends them through memory, and
its time grows faster than length once its arrays leave the L2 cache
(`implementation` chooses).
`decode_step` is the same computation as a recurrence over that fixed-size
state (`RecurrentState`): the RNN view, for decoding; `prefill` runs the
chunked form from a state and hands back its final state. An additive position bias cannot enter a feature
map, so this op takes none.

FAVOR+ stability (the Performer stabiliser, made causal). A key's features
are kept as phi(k) = phi_hat(k) * exp(shift(k)) with shift(k) the key's
largest feature logit, so phi_hat is at most 1 + eps. A query divides every
key weight by exp(M), M the largest shift among the keys it sees (a running
maximum in the causal and recurrent forms, like an online softmax), which
cancels exactly between numerator and normaliser: no exp overflows and no
large-norm key underflows to zero features unless its true weight is
negligible beside another key's. eps is added to phi_hat (relative to the
key's own scale), so the normaliser stays positive.
"""

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from zoo import registry
from zoo.attention.kernels import fused_cpu, placement
from zoo.attention import parts
from zoo.attention.base import AttentionOp, group_queries

_EPS = 1e-6  # added to FAVOR+ key features (relative to each key's largest)


def _normalise(num, den):
  """num / den, zero where no key contributed (den == 0)."""
  return num / jnp.where(den > 0, den, 1.0)[..., None]


def _rescale(old, new):
  """exp(old - new) for running maxima new >= old; 0 where old is -inf (no
  key yet), so -inf - -inf never makes a NaN."""
  safe_new = jnp.where(jnp.isfinite(new), new, 0.0)
  return jnp.where(jnp.isfinite(old), jnp.exp(old - safe_new), 0.0)


@functools.lru_cache(maxsize=256)
def _favor_rows(seed: int, layer: int, draw: int, kv_heads: int,
                num_rows: int, dim: int) -> np.ndarray:
  """GxFxK FAVOR+ rows, one set per kv head from numpy's
  default_rng((seed, layer, draw, head)): blocks of `dim` orthonormal rows,
  each row rescaled to the norm of a Gaussian vector, so every row is
  Gaussian and rows within a block are orthogonal. Blocks are Haar-random: Q
  of a Gaussian matrix's QR with the signs of R's diagonal folded in (Q
  alone is biased). Drawn on the host: XLA:CPU in jax 0.10.2 can deadlock a
  program holding several QR decompositions (LAPACK calls share the 2-core
  pool they run on)."""
  heads = []
  for head in range(kv_heads):
    rng = np.random.default_rng((seed, layer, draw, head))
    blocks = []
    for _ in range(-(-num_rows // dim)):
      q_KxK, r_KxK = np.linalg.qr(rng.standard_normal((dim, dim)))
      blocks.append((q_KxK * np.sign(np.diag(r_KxK))).T)
    norms_F = np.linalg.norm(rng.standard_normal((num_rows, dim)), axis=1)
    heads.append(np.concatenate(blocks)[:num_rows] * norms_F[:, None])
  rows = np.stack(heads).astype(np.float32)
  rows.flags.writeable = False
  return rows


@registry.register("attention", "linear")
@dataclasses.dataclass(frozen=True)
class Linear(AttentionOp):
  """Kernel linear attention, out_t = phi(q_t).S / phi(q_t).z with
  S = sum phi(k_s) v_s^T and z = sum phi(k_s) over the visible keys.

  feature "elu": phi(x) = elu(x) + 1, F = head_dim (num_features, seed and
  redraw_every are unused). "favor": Performer's positive random features
  phi(x) = exp(w x - |x|^2 / 2) of x = head vector * head_dim**-0.25, with
  F = num_features rows w of orthogonal Gaussian blocks, an unbiased
  estimate of the softmax kernel; the rows are drawn per layer and per kv
  head (`projection`), and with redraw_every = N > 0 redrawn every N
  training steps, as the paper does (0, the default, keeps one draw; the
  model binds the step with `at_step`).
  num_features defaults to 256 (the estimate's variance falls as
  1 / num_features). `chunk` is the causal chunk
  length of the XLA form. `implementation`: 'xla' (any device, masks),
  'fused' (the C++ kernel in fused_cpu: causal CPU self-attention without a
  padding mask, 64-key chunks kept in cache) or None: 'fused' where it
  applies, else 'xla' (with one warning if the kernel cannot be built).
  `short_conv=W` > 0 puts a causal depthwise convolution of width W (SiLU)
  on q, k and v in the layer (`parts.ConvPart`), as Zoology's and
  flash-linear-attention's linear baselines have.

  Rotary positions are refused with elu features: elu(Rq) + 1 of rotated
  q and k makes scores depend on absolute position. With FAVOR+, rotating q
  and k first estimates the rotated softmax kernel exp(q.R k), which depends
  only on the offset in expectation over draws (RoFormer's linear form,
  rotating the features and not the normaliser, is not built).
  """

  feature: str = "elu"
  num_features: int = 256
  chunk: int = 64
  redraw_every: int = 0
  seed: int = 0
  layer: int = 0
  implementation: str | None = None
  short_conv: int = 0
  step: Any = dataclasses.field(default=None, compare=False, repr=False)

  def __post_init__(self):
    fused_cpu.check_implementation("linear", self.implementation)
    if self.feature not in ("elu", "favor"):
      raise ValueError(
          f"attention linear(feature=...) must be 'elu' or 'favor'; "
          f"got {self.feature!r}")
    for name, low in (("num_features", 1), ("chunk", 1), ("redraw_every", 0),
                      ("seed", 0), ("short_conv", 0)):
      if getattr(self, name) < low:
        raise ValueError(
            f"attention linear({name}=...) must be >= {low}; "
            f"got {getattr(self, name)}")

  @property
  def positions(self) -> frozenset:
    if self.feature == "elu":
      return frozenset({"none", "absolute"})
    return frozenset({"none", "absolute", "rotary"})

  def feature_dim(self, head_dim: int) -> int:
    """F, the size of phi(x) for head vectors of size head_dim."""
    return head_dim if self.feature == "elu" else self.num_features

  def layer_part(self, *, embed_dim, num_heads, num_kv_heads, head_dim, rngs,
                 dtype, param_dtype):
    del embed_dim
    if not self.short_conv:
      return None
    return parts.ConvPart(num_heads=num_heads, num_kv_heads=num_kv_heads,
                          head_dim=head_dim, width=self.short_conv,
                          rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  @property
  def redraws(self) -> bool:
    return self.redraw_every > 0

  def at_step(self, step) -> "Linear":
    return dataclasses.replace(self, step=step) if self.redraws else self

  def draw(self):
    """Which FAVOR+ draw the bound training step uses (0 without
    redraws)."""
    if not self.redraws or self.step is None:
      return 0
    return self.step // self.redraw_every

  def projection(self, head_dim: int, kv_heads: int, draw=0):
    """FAVOR+ rows GxFxK, one block per kv head, drawn from
    (seed, layer, draw, head) (`_favor_rows`). A traced `draw` (redraws
    during training) fetches the rows from the host by a callback."""
    shape = (self.seed, self.layer)
    rows = lambda d: _favor_rows(*shape, int(d), kv_heads, self.num_features,
                                 head_dim)
    if not isinstance(draw, jax.core.Tracer):
      return jnp.asarray(rows(draw))
    return jax.pure_callback(
        rows, jax.ShapeDtypeStruct((kv_heads, self.num_features, head_dim),
                                   jnp.float32), draw)

  def query_features(self, q_xGxRxK, w_GxFxK):
    """phi(q) ...xGxRxF, scaled by its largest feature (a factor that
    cancels between numerator and normaliser)."""
    x = q_xGxRxK.astype(jnp.float32)
    if self.feature == "elu":
      return jax.nn.elu(x) + 1.0
    logits = _favor_logits(x, w_GxFxK, -3)
    return jnp.exp(logits - jax.lax.stop_gradient(
        jnp.max(logits, axis=-1, keepdims=True)))

  def key_features(self, k_xGxK, w_GxFxK, valid_x=None):
    """(phi_hat ...xGxF, shift ...xG) with phi(k) = phi_hat * exp(shift)
    (see the module docstring); masked keys get phi_hat 0, shift -inf."""
    x = k_xGxK.astype(jnp.float32)
    if self.feature == "elu":
      phi_hat, shift = jax.nn.elu(x) + 1.0, jnp.zeros(x.shape[:-1])
    else:
      logits = _favor_logits(x, w_GxFxK, -2)
      shift = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
      phi_hat = jnp.exp(logits - shift[..., None]) + _EPS
    if valid_x is not None:
      valid = jnp.broadcast_to(valid_x[..., None], shift.shape)
      phi_hat = jnp.where(valid[..., None], phi_hat, 0.0)
      shift = jnp.where(valid, shift, -jnp.inf)
    return phi_hat, shift

  def _weights(self, head_dim: int, kv_heads: int, draw):
    if self.feature == "elu":
      return None
    return self.projection(head_dim, kv_heads, draw)

  def attend(self, q, k, v, *, causal, mask, bias):
    del bias  # refused by check
    b, t, h, d = q.shape
    g = k.shape[2]
    w_GxFxK = self._weights(d, g, self.draw())
    phi_q_BxTxGxRxF = self.query_features(group_queries(q, g), w_GxFxK)
    phi_k_BxSxGxF, shift_BxSxG = self.key_features(k, w_GxFxK, mask)
    v_BxSxGxK = v.astype(jnp.float32)
    if self._fused(q, k, mask, causal):
      def run(phi_q_BxTxHxF, phi_k_BxTxGxF, shift_BxTxG, v_BxTxGxK, _):
        return _normalise(*fused_cpu.causal_linear(
            phi_q_BxTxHxF, phi_k_BxTxGxF, shift_BxTxG, v_BxTxGxK))
      out = placement.shard_heads(
          run, phi_q_BxTxGxRxF.reshape(b, t, h, -1), phi_k_BxSxGxF,
          shift_BxSxG, v_BxSxGxK)
    elif causal:
      out, _ = self._causal(phi_q_BxTxGxRxF, phi_k_BxSxGxF, shift_BxSxG,
                            v_BxSxGxK)
    else:
      state_BxGxFxK, z_BxGxF, _ = _state(phi_k_BxSxGxF, shift_BxSxG,
                                         v_BxSxGxK)
      out = _normalise(
          jnp.einsum("btgrf,bgfk->btgrk", phi_q_BxTxGxRxF, state_BxGxFxK),
          jnp.einsum("btgrf,bgf->btgr", phi_q_BxTxGxRxF, z_BxGxF))
    return out.reshape(b, t, h, d).astype(q.dtype)

  def _fused(self, q, k, mask, causal) -> bool:
    """Whether this call runs the fused kernel (`fused_cpu.use`)."""
    return fused_cpu.use(
        "linear", self.implementation,
        "causal CPU self-attention without a padding mask",
        (not causal and "causal=False")
        or (mask is not None and "a padding mask")
        or (q.shape[1] != k.shape[1] and "q_len != kv_len"))

  def _causal(self, phi_q_BxTxGxRxF, phi_k_BxSxGxF, shift_BxSxG, v_BxSxGxK,
              initial: Optional["RecurrentState"] = None):
    """Chunked causal form; query i sits at key position S - T + i, after
    the keys summed in `initial` (none by default). Returns (out, the
    state after the last key)."""
    t, s = phi_q_BxTxGxRxF.shape[1], phi_k_BxSxGxF.shape[1]
    # Align the ends: extra leading queries (S > T) are dropped afterwards,
    # extra leading keys (T > S) are masked. Then pad the common length u to
    # whole chunks.
    u = max(t, s)
    c = min(self.chunk, u)
    n = -(-u // c)

    def chunks(x, front, fill=0.0):
      pad = [(0, 0)] * x.ndim
      pad[1] = (front, n * c - u)
      x = jnp.pad(x, pad, constant_values=fill)
      return x.reshape(x.shape[0], n, c, *x.shape[2:])

    phi_q_BxNxCxGxRxF = chunks(phi_q_BxTxGxRxF, u - t)
    phi_k_BxNxCxGxF = chunks(phi_k_BxSxGxF, u - s)
    shift_BxNxCxG = chunks(shift_BxSxG, u - s, -jnp.inf)
    v_BxNxCxGxK = chunks(v_BxSxGxK, u - s)
    # Running maximum of the key shifts: within a chunk, then across chunks.
    local_max_BxNxCxG = jax.lax.cummax(shift_BxNxCxG, axis=2)
    chunk_max_BxNxG = local_max_BxNxCxG[:, :, -1]
    to_chunk_max = _rescale(shift_BxNxCxG, chunk_max_BxNxG[:, :, None])
    final, (state_BxNxGxFxK, z_BxNxGxF, prev_max_BxNxG) = _before_each_chunk(
        jnp.einsum("bncgf,bncg,bncgk->bngfk", phi_k_BxNxCxGxF, to_chunk_max,
                   v_BxNxCxGxK),
        jnp.einsum("bncgf,bncg->bngf", phi_k_BxNxCxGxF, to_chunk_max),
        chunk_max_BxNxG, initial)
    query_max_BxNxCxG = jnp.maximum(prev_max_BxNxG[:, :, None],
                                    local_max_BxNxCxG)
    # Inside a chunk: the quadratic form, lower-triangular, each key scaled
    # to the query's running maximum.
    tri_CxE = np.tril(np.ones((c, c), bool))
    exponent_BxNxCxExG = jnp.where(
        tri_CxE[:, :, None] & jnp.isfinite(shift_BxNxCxG)[:, :, None],
        shift_BxNxCxG[:, :, None] - jnp.where(
            jnp.isfinite(query_max_BxNxCxG), query_max_BxNxCxG,
            0.0)[:, :, :, None], -jnp.inf)
    scale_BxNxCxGx1xE = jnp.exp(exponent_BxNxCxExG).transpose(
        0, 1, 2, 4, 3)[:, :, :, :, None, :]
    a_BxNxCxGxRxE = jnp.einsum("bncgrf,bnegf->bncgre", phi_q_BxNxCxGxRxF,
                               phi_k_BxNxCxGxF) * scale_BxNxCxGx1xE
    num_BxNxCxGxRxK = jnp.einsum("bncgre,bnegk->bncgrk", a_BxNxCxGxRxE,
                                 v_BxNxCxGxK)
    den_BxNxCxGxR = jnp.sum(a_BxNxCxGxRxE, axis=-1)
    # Across chunks: the state of all earlier chunks, rescaled likewise.
    carry_BxNxCxGx1 = _rescale(prev_max_BxNxG[:, :, None],
                               query_max_BxNxCxG)[..., None]
    num_BxNxCxGxRxK += carry_BxNxCxGx1[..., None] * jnp.einsum(
        "bncgrf,bngfk->bncgrk", phi_q_BxNxCxGxRxF, state_BxNxGxFxK)
    den_BxNxCxGxR += carry_BxNxCxGx1 * jnp.einsum(
        "bncgrf,bngf->bncgr", phi_q_BxNxCxGxRxF, z_BxNxGxF)
    out = _normalise(num_BxNxCxGxRxK, den_BxNxCxGxR)
    return (out.reshape(out.shape[0], n * c, *out.shape[3:])[:, u - t:u],
            RecurrentState(*final))

  def init_state(self, batch, capacity, kv_heads, head_dim, dtype):
    """Empty recurrent state (fp32 whatever `dtype`); its size does not
    depend on `capacity`."""
    del capacity, dtype
    f = self.feature_dim(head_dim)
    return RecurrentState(
        jnp.zeros((batch, kv_heads, f, head_dim), jnp.float32),
        jnp.zeros((batch, kv_heads, f), jnp.float32),
        jnp.full((batch, kv_heads), -jnp.inf, jnp.float32))

  def state_size(self, length, kv_heads, head_dim):
    del length
    f = self.feature_dim(head_dim)
    return kv_heads * (f * head_dim + f + 1)

  def prefill(self, state, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, *, index, bias,
              **gates):
    """The chunked causal form started from `state`: (out, final state)."""
    del gates  # this op takes none (refused by `check`)
    del index, bias  # no bias (refused when built)
    b, t, h, d = q_BxTxHxK.shape
    g = k_BxTxGxK.shape[2]
    w_GxFxK = self._weights(d, g, self.draw())
    phi_k_BxTxGxF, shift_BxTxG = self.key_features(k_BxTxGxK, w_GxFxK)
    out, state = self._causal(
        self.query_features(group_queries(q_BxTxHxK, g), w_GxFxK),
        phi_k_BxTxGxF, shift_BxTxG, v_BxTxGxK.astype(jnp.float32), state)
    return out.reshape(b, t, h, d).astype(q_BxTxHxK.dtype), state

  def decode_step(self, state, q_BxHxK, k_BxGxK, v_BxGxK, *, index, bias,
                  **gates):
    """One causal step: adds the key to the state, then attends the query;
    the same output as the causal op."""
    del gates  # this op takes none (refused by `check`)
    del index, bias
    state_BxGxFxK, z_BxGxF, max_BxG = (state.s_BxGxFxK, state.z_BxGxF,
                                       state.max_BxG)
    b, h, d = q_BxHxK.shape
    g = k_BxGxK.shape[1]
    w_GxFxK = self._weights(d, g, self.draw())
    phi_k_BxGxF, shift_BxG = self.key_features(k_BxGxK, w_GxFxK)
    new_max_BxG = jnp.maximum(max_BxG, shift_BxG)
    old_BxG, new_BxG = (_rescale(m, new_max_BxG) for m in (max_BxG,
                                                           shift_BxG))
    phi_k_BxGxF = phi_k_BxGxF * new_BxG[..., None]
    state_BxGxFxK = state_BxGxFxK * old_BxG[..., None, None] + (
        phi_k_BxGxF[..., None] * v_BxGxK.astype(jnp.float32)[:, :, None, :])
    z_BxGxF = z_BxGxF * old_BxG[..., None] + phi_k_BxGxF
    phi_q_BxGxRxF = self.query_features(q_BxHxK.reshape(b, g, h // g, d),
                                        w_GxFxK)
    out = _normalise(
        jnp.einsum("bgrf,bgfk->bgrk", phi_q_BxGxRxF, state_BxGxFxK),
        jnp.einsum("bgrf,bgf->bgr", phi_q_BxGxRxF, z_BxGxF))
    return (out.reshape(b, h, d).astype(q_BxHxK.dtype),
            RecurrentState(state_BxGxFxK, z_BxGxF, new_max_BxG))


@struct.dataclass
class RecurrentState:
  """Linear attention's decode state: S = sum phi(k) v^T and z = sum phi(k)
  over the keys so far, both scaled to the running maximum of the key
  shifts (-inf before any key; see the module docstring)."""

  s_BxGxFxK: jax.Array
  z_BxGxF: jax.Array
  max_BxG: jax.Array


def _favor_logits(x, w_GxFxK, kv_axis: int):
  """w x - |x|^2 / 2 of x = head vector * head_dim**-0.25 (fp32), x with
  its kv heads on axis `kv_axis`. The product runs as a matmul batched over
  kv heads put first: as an einsum with the heads in the middle, XLA:CPU
  fused it into an elementwise loop, the largest part of FAVOR+'s time at
  length 8192."""
  x = x * x.shape[-1]**-0.25
  x_Gx_xK = jnp.moveaxis(x, kv_axis, 0)
  g, f = w_GxFxK.shape[:2]
  logits_GxNxF = jnp.matmul(x_Gx_xK.reshape(g, -1, x.shape[-1]),
                            jnp.swapaxes(w_GxFxK, 1, 2))
  logits = jnp.moveaxis(logits_GxNxF.reshape(*x_Gx_xK.shape[:-1], f), 0,
                        kv_axis)
  return logits - jnp.sum(x * x, -1, keepdims=True) / 2


def _state(phi_k_BxSxGxF, shift_BxSxG, v_BxSxGxK):
  """(S BxGxFxK, z BxGxF, max BxG) of all keys, scaled to their largest
  shift."""
  max_BxG = jnp.max(shift_BxSxG, axis=1)
  scale_BxSxG = _rescale(shift_BxSxG, max_BxG[:, None])
  return (jnp.einsum("bsgf,bsg,bsgk->bgfk", phi_k_BxSxGxF, scale_BxSxG,
                     v_BxSxGxK),
          jnp.einsum("bsgf,bsg->bgf", phi_k_BxSxGxF, scale_BxSxG), max_BxG)


def _before_each_chunk(state_BxNxGxFxK, z_BxNxGxF, max_BxNxG, initial=None):
  """Given each chunk's state and normaliser scaled to its own maximum,
  the final (state, normaliser, maximum) and the running ones of the
  chunks before each chunk (`initial`'s, or zero and -inf, for the first):
  the carry of a lax.scan over chunks. (jnp.cumsum lowers to a
  reduce-window, quadratic in N on CPU.)"""

  def add(carry, chunk):
    state, z, top = carry
    chunk_state, chunk_z, chunk_top = chunk
    new_top = jnp.maximum(top, chunk_top)
    old, new = _rescale(top, new_top), _rescale(chunk_top, new_top)
    return ((state * old[..., None, None] + chunk_state * new[..., None, None],
             z * old[..., None] + chunk_z * new[..., None], new_top), carry)

  xs = tuple(jnp.moveaxis(a, 1, 0)
             for a in (state_BxNxGxFxK, z_BxNxGxF, max_BxNxG))
  if initial is None:
    init = (jnp.zeros_like(xs[0][0]), jnp.zeros_like(xs[1][0]),
            jnp.full_like(xs[2][0], -jnp.inf))
  else:
    init = (initial.s_BxGxFxK, initial.z_BxGxF, initial.max_BxG)
  final, before = jax.lax.scan(add, init, xs)
  return final, tuple(jnp.moveaxis(a, 0, 1) for a in before)
