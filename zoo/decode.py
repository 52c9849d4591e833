"""Decoding: prefill a prompt in one call, then one token at a time against a
decode state per attention family; and a sampler compiled as one loop.

A layer's decode state is a pytree chosen by its attention op's family:

- KV cache (standard, xla, blockwise): keys and values BxGxCxK of fixed
  capacity C, written in place (dynamic_update_slice); the new query at
  position p attends to the cached keys j < p and its own key (read before
  the write, so XLA keeps the update in place).
- KV cache with the pattern's row (sparse, bigbird): as above, the query
  seeing the keys of row p of the op's causal pattern at length C,
  `op.allows(i, j, t=C, causal=True)`, held as an index of distinct tiles
  (no CxC array). Both patterns are prefix-consistent: row i depends only on
  i and the rows before it (BigBird draws row i's random blocks after the
  rows above), so the pattern at C agrees with the training length's on
  their common rows and prefill + decode equals the forward pass. Decoding
  reads the whole cache under the mask: O(C) per token, like dense.
- Ring buffer (local): the last min(window, C) keys and values, position p in
  slot p % W, so memory stays constant however long the generation.
- Recurrent state (linear, elu+1 and FAVOR+): `Linear.init_state`,
  `prefill_state` and `step`; O(1) memory and time per token.
`splash` decodes through the op whose pattern it mirrors (its prefill runs
the splash op itself, the kernel where there is one). Only kv heads are
cached (grouped-query attention). An op of no family above is refused when
its decode state is built.

Prefill runs the op itself on the prompt, so the prompt's outputs are the
forward pass's, and fills an empty state; a step adds one key and attends
one query. Positions: `Cache.index`, shared by every layer, is the position
of the next token; models rotate q and k at it (rotary), embed at it
(absolute tables, sinusoidal) and pass the bias callable the query's and the
cached keys' positions (ALiBi, T5).

Shapes: B batch, T new tokens, C capacity, W ring slots, H heads, G kv heads,
R = H // G, K head dim, N tile rows/columns of L positions, U distinct tiles.
"""

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from zoo.attention import blockwise, dense, kernels, linear, local, sparse
from zoo.attention.base import AttentionOp
from zoo.sharding import constrain

# Logical axes of cached keys and values (head-major, so the step's matrix
# products read the cache in place): those of the attention activations.
CACHE_AXES = ("batch", "heads", "length", "kv")


@struct.dataclass
class KVCache:
  """Keys and values of positions 0..C-1 (zeros where not yet written)."""

  k_BxGxCxK: jax.Array
  v_BxGxCxK: jax.Array


@struct.dataclass
class Ring:
  """The last W keys and values; slot s holds the newest position p with
  p % W == s."""

  k_BxGxWxK: jax.Array
  v_BxGxWxK: jax.Array


@struct.dataclass
class Cache:
  """A model's decode state: the position of the next token, each layer's
  state, and the capacity (static)."""

  index: jax.Array
  layers: list
  max_len: int = struct.field(pytree_node=False)


class Decoder:
  """How one attention op decodes: `op` runs the prompt (prefill), `pattern`
  (the op, or the op a splash op mirrors) defines the state and the step."""

  def __init__(self, op: AttentionOp, pattern: AttentionOp):
    self.op, self.pattern = op, pattern

  def init(self, batch: int, max_len: int, kv_heads: int, head_dim: int,
           dtype) -> Any:
    raise NotImplementedError

  def fill(self, state, k_BxTxGxK, v_BxTxGxK, step):
    """The state after keys and values at positions 0..T-1."""
    raise NotImplementedError

  def prefill(self, state, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, *, bias, step):
    """(state, out_BxTxHxK) of a prompt at positions 0..T-1; `state` is
    empty."""
    out = self.op(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, causal=True, bias=bias,
                  step=step)
    return self.fill(state, k_BxTxGxK, v_BxTxGxK, step), out

  def step(self, state, index, q_BxHxK, k_BxGxK, v_BxGxK, *, bias, step):
    """(state, out_BxHxK): the query at position `index` (traced) attends
    the state and its own key, which the state then takes in."""
    raise NotImplementedError


class KVCacheDecoder(Decoder):
  """Dense causal softmax over a KV cache of fixed capacity."""

  def init(self, batch, max_len, kv_heads, head_dim, dtype):
    shape = (batch, kv_heads, max_len, head_dim)
    return KVCache(*(constrain(jnp.zeros(shape, dtype), CACHE_AXES)
                     for _ in "kv"))

  def fill(self, state, k_BxTxGxK, v_BxTxGxK, step):
    del step
    return KVCache(_write(state.k_BxGxCxK, k_BxTxGxK.transpose(0, 2, 1, 3), 0),
                   _write(state.v_BxGxCxK, v_BxTxGxK.transpose(0, 2, 1, 3), 0))

  def step(self, state, index, q_BxHxK, k_BxGxK, v_BxGxK, *, bias, step):
    del step
    c = state.k_BxGxCxK.shape[2]
    k_pos_C = jnp.arange(c)
    row_xC = self.allowed(index, c, q_BxHxK.shape[1])
    bias_HxC = None if bias is None else bias(index[None], k_pos_C)[:, 0]
    out_BxHxK = attend_one(
        q_BxHxK, state.k_BxGxCxK, state.v_BxGxCxK, row_xC & (k_pos_C < index),
        bias_HxC, k_BxGxK, v_BxGxK, row_xC[:, index],
        None if bias_HxC is None else bias_HxC[:, index])
    k_BxGxK, v_BxGxK = _after(out_BxHxK, k_BxGxK, v_BxGxK)
    return KVCache(_write(state.k_BxGxCxK, k_BxGxK[:, :, None], index),
                   _write(state.v_BxGxCxK, v_BxGxK[:, :, None], index)
                   ), out_BxHxK

  def allowed(self, index, capacity: int, num_heads: int):
    """1xC or HxC bool: the keys the query at `index` sees (itself
    included)."""
    del num_heads
    return (jnp.arange(capacity) <= index)[None]


class PatternDecoder(KVCacheDecoder):
  """A KV cache whose query sees its row of the op's causal pattern at the
  cache's capacity (tiles of the op's `block`)."""

  def allowed(self, index, capacity, num_heads):
    index_HxNxN, tiles_UxLxL = pattern_tiles(self.pattern, capacity,
                                             num_heads, self.pattern.block)
    l = tiles_UxLxL.shape[1]
    ids_HxN = jnp.asarray(index_HxNxN)[:, index // l]
    row_HxNxL = jnp.asarray(tiles_UxLxL)[ids_HxN, index % l]
    return row_HxNxL.reshape(row_HxNxL.shape[0], -1)[:, :capacity]


class RingDecoder(Decoder):
  """Sliding-window attention over a ring buffer of the window."""

  def init(self, batch, max_len, kv_heads, head_dim, dtype):
    w = min(self.pattern.window, max_len)
    shape = (batch, kv_heads, w, head_dim)
    return Ring(*(constrain(jnp.zeros(shape, dtype), CACHE_AXES)
                  for _ in "kv"))

  def fill(self, state, k_BxTxGxK, v_BxTxGxK, step):
    del step
    w, t = state.k_BxGxWxK.shape[2], k_BxTxGxK.shape[1]
    pos = np.arange(max(t - w, 0), t)
    put = lambda ring, x_BxTxGxK: constrain(ring.at[:, :, pos % w].set(
        x_BxTxGxK[:, pos].transpose(0, 2, 1, 3).astype(ring.dtype)),
                                            CACHE_AXES)
    return Ring(put(state.k_BxGxWxK, k_BxTxGxK),
                put(state.v_BxGxWxK, v_BxTxGxK))

  def step(self, state, index, q_BxHxK, k_BxGxK, v_BxGxK, *, bias, step):
    del step
    w = state.k_BxGxWxK.shape[2]
    # Before the write, slot s holds the newest position < index congruent to
    # s; the slot written now holds index - W, which leaves the window.
    held_W = index - 1 - (index - 1 - jnp.arange(w)) % w
    out_BxHxK = attend_one(
        q_BxHxK, state.k_BxGxWxK, state.v_BxGxWxK,
        ((held_W >= 0) & (held_W > index - w))[None],
        None if bias is None else bias(index[None], held_W)[:, 0],
        k_BxGxK, v_BxGxK, jnp.ones((1,), bool),
        None if bias is None else bias(index[None], index[None])[:, 0, 0])
    slot = index % w
    k_BxGxK, v_BxGxK = _after(out_BxHxK, k_BxGxK, v_BxGxK)
    return Ring(_write(state.k_BxGxWxK, k_BxGxK[:, :, None], slot),
                _write(state.v_BxGxWxK, v_BxGxK[:, :, None], slot)), out_BxHxK


class RecurrentDecoder(Decoder):
  """Linear attention's recurrent state (S, z, running max)."""

  def init(self, batch, max_len, kv_heads, head_dim, dtype):
    del max_len, dtype
    return _constrain_recurrent(
        self.pattern.init_state(batch, kv_heads, head_dim))

  def fill(self, state, k_BxTxGxK, v_BxTxGxK, step):
    del state
    return _constrain_recurrent(
        self.pattern.prefill_state(k_BxTxGxK, v_BxTxGxK, step=step))

  def step(self, state, index, q_BxHxK, k_BxGxK, v_BxGxK, *, bias, step):
    del index, bias  # linear ops take no bias (refused when built)
    state, out_BxHxK = self.pattern.step(state, q_BxHxK, k_BxGxK, v_BxGxK,
                                         step=step)
    return _constrain_recurrent(state), out_BxHxK


# Each family: the ops it decodes (by class) and how.
FAMILIES = (
    ((dense.Standard, dense.Xla, blockwise.Blockwise), KVCacheDecoder),
    ((sparse.Sparse, sparse.BigBird), PatternDecoder),
    ((local.Local,), RingDecoder),
    ((linear.Linear,), RecurrentDecoder),
)


def decoder(op: AttentionOp) -> Decoder:
  """The decoder of `op` (a splash op decodes through its pattern op);
  raises ValueError for an op of no decodable family."""
  pattern = op.pattern if isinstance(op, kernels.Splash) else op
  for types, family in FAMILIES:
    if isinstance(pattern, types):
      return family(op, pattern)
  valid = [t.registry_name for types, _ in FAMILIES for t in types]
  raise ValueError(
      f"attention {type(op).registry_name}: no decode state for "
      f"{type(pattern).__name__}; decodable: {', '.join(valid)} and splash of "
      "those")


def attend_one(q_BxHxK, k_BxGxCxK, v_BxGxCxK, allowed_xC, bias_HxC,
               k_new_BxGxK, v_new_BxGxK, allowed_new_x, bias_new_H):
  """Softmax attention (fp32) of one query per head over C cached keys and
  its own new key, the two parts merged by their maxima: the cache is read
  before the new key is written, so XLA updates it in place. `allowed_xC`
  (1xC or HxC) and `allowed_new_x` (1 or H) mark the keys each head sees;
  the biases may be None."""
  b, h, d = q_BxHxK.shape
  g, c = k_BxGxCxK.shape[1], k_BxGxCxK.shape[2]
  r = h // g
  q_BxGxRxK = q_BxHxK.reshape(b, g, r, d).astype(jnp.float32) / np.sqrt(d)
  logits_BxGxRxC = jnp.einsum("bgrd,bgcd->bgrc", q_BxGxRxK,
                              k_BxGxCxK.astype(jnp.float32))
  new_BxGxR = jnp.einsum("bgrd,bgd->bgr", q_BxGxRxK,
                         k_new_BxGxK.astype(jnp.float32))
  if bias_HxC is not None:
    logits_BxGxRxC += bias_HxC.astype(jnp.float32).reshape(g, r, c)
    new_BxGxR += bias_new_H.astype(jnp.float32).reshape(g, r)
  allowed_GxRxC = jnp.broadcast_to(allowed_xC, (h, c)).reshape(g, r, c)
  allowed_new_GxR = jnp.broadcast_to(allowed_new_x, (h,)).reshape(g, r)
  logits_BxGxRxC = jnp.where(allowed_GxRxC, logits_BxGxRxC, -jnp.inf)
  new_BxGxR = jnp.where(allowed_new_GxR, new_BxGxR, -jnp.inf)
  top_BxGxR = jnp.maximum(logits_BxGxRxC.max(-1), new_BxGxR)
  top_BxGxR = jnp.where(jnp.isfinite(top_BxGxR), top_BxGxR, 0.0)
  weights_BxGxRxC = jnp.exp(logits_BxGxRxC - top_BxGxR[..., None])
  weight_new_BxGxR = jnp.exp(new_BxGxR - top_BxGxR)
  total_BxGxR = weights_BxGxRxC.sum(-1) + weight_new_BxGxR
  out_BxGxRxK = (jnp.einsum("bgrc,bgcd->bgrd", weights_BxGxRxC,
                            v_BxGxCxK.astype(jnp.float32))
                 + weight_new_BxGxR[..., None]
                 * v_new_BxGxK.astype(jnp.float32)[:, :, None])
  out_BxGxRxK /= jnp.where(total_BxGxR > 0, total_BxGxR, 1.0)[..., None]
  return out_BxGxRxK.reshape(b, h, d).astype(q_BxHxK.dtype)


@functools.lru_cache(maxsize=32)
def pattern_tiles(op: AttentionOp, capacity: int, num_heads: int, tile: int
                  ) -> tuple[np.ndarray, np.ndarray]:
  """`op`'s causal pattern at length `capacity` as an index HxNxN (or 1xNxN
  for a pattern shared by all heads; N = ceil(C / L) blocks of L = `tile`)
  into U distinct LxL tiles, False beyond C. Evaluated from `op.allows` one
  row of blocks at a time, so no CxC array is held."""
  n = -(-capacity // tile)
  keys_C = np.arange(capacity)
  found, tiles, rows = {}, [], []
  for block in range(n):
    queries = np.arange(block * tile, min(block * tile + tile, capacity))
    allowed = op.allows(queries[:, None], keys_C[None, :], t=capacity,
                        causal=True, num_heads=num_heads)
    h = allowed.shape[0]
    padded_HxLxNL = np.zeros((h, tile, n * tile), bool)
    padded_HxLxNL[:, :queries.size, :capacity] = allowed
    tiles_HNxLL = padded_HxLxNL.reshape(h, tile, n, tile).transpose(
        0, 2, 1, 3).reshape(h * n, tile * tile)
    ids = np.empty(h * n, np.int32)
    for i, packed in enumerate(np.packbits(tiles_HNxLL, axis=1)):
      if packed.tobytes() not in found:
        found[packed.tobytes()] = len(tiles)
        tiles.append(tiles_HNxLL[i].reshape(tile, tile).copy())
      ids[i] = found[packed.tobytes()]
    rows.append(ids.reshape(h, n))
  return np.stack(rows, axis=1), np.stack(tiles)


def _after(out_BxHxK, *xs):
  """`xs` made to depend on the attention output (plus 0 times one of its
  elements; XLA keeps x + 0 * y for floats), so the cache write follows the
  cache reads: XLA's CPU copy insertion then updates the cache in place
  instead of copying it every step (measured: 42 ms -> 5 ms per token of a
  2-layer model at 16K positions)."""
  zero = 0.0 * out_BxHxK[0, 0, 0].astype(jnp.float32)
  return tuple((x.astype(jnp.float32) + zero).astype(x.dtype) for x in xs)


def _write(cache_BxGxCxK, x_BxGxTxK, start):
  """Writes x into the cache from position `start` (may be traced)."""
  return constrain(jax.lax.dynamic_update_slice_in_dim(
      cache_BxGxCxK, x_BxGxTxK.astype(cache_BxGxCxK.dtype), start, axis=2),
                   CACHE_AXES)


def _constrain_recurrent(state):
  s_BxGxFxK, z_BxGxF, max_BxG = state
  return (constrain(s_BxGxFxK, ("batch", "heads", None, "kv")),
          constrain(z_BxGxF, ("batch", "heads", None)),
          constrain(max_BxG, ("batch", "heads")))


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How each next token is drawn: greedy (argmax) at temperature 0; else
  from softmax(logits / temperature) kept to the top_k most likely tokens
  (0: all), then to the smallest set of them whose probability reaches top_p
  (nucleus; 1.0: all). A row's generation ends after `stop_token`."""

  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  stop_token: Optional[int] = None

  def __post_init__(self):
    if not (np.isfinite(self.temperature) and self.temperature >= 0):
      raise ValueError(f"temperature={self.temperature} must be >= 0 "
                       "(0: greedy)")
    if self.top_k < 0:
      raise ValueError(f"top_k={self.top_k} must be >= 0 (0: all tokens)")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1: all "
                       "tokens)")
    if self.stop_token is not None and self.stop_token < 0:
      raise ValueError(f"stop_token={self.stop_token} must be a token id "
                       ">= 0 or None")


def choose(logits_BxV, key, sampling: Sampling):
  """The next token of each row (int32 B) under `sampling`."""
  if sampling.temperature == 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = logits_BxV.astype(jnp.float32) / sampling.temperature
  if sampling.top_k:
    kth_Bx1 = jax.lax.top_k(logits_BxV, sampling.top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV >= kth_Bx1, logits_BxV, -jnp.inf)
  if sampling.top_p < 1:
    sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    # Keep each token whose more likely tokens hold less than top_p.
    kept_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV < sampling.top_p
    cutoff_Bx1 = jnp.min(jnp.where(kept_BxV, sorted_BxV, jnp.inf), axis=-1,
                         keepdims=True)
    logits_BxV = jnp.where(logits_BxV >= cutoff_Bx1, logits_BxV, -jnp.inf)
  return jax.random.categorical(key, logits_BxV).astype(jnp.int32)


def generate(model, prompt_BxP, *, max_new_tokens: int,
             sampling: Sampling = Sampling(), seed: int = 0,
             step: Optional[jax.Array] = None,
             max_len: Optional[int] = None):
  """Samples up to `max_new_tokens` tokens after each prompt row with a
  decoder LM (`init_cache`, `prefill`, `decode_step`): one compiled program,
  the prompt prefilled in one call and the tokens drawn in a
  `lax.while_loop` that ends when every row has emitted the stop token.
  `max_len` (default prompt + max_new_tokens - 1, the positions fed) is the
  cache's capacity;
  `step` the training step (for attention that redraws random features).
  Returns (tokens BxN int32, the stop token after a row's end, and lengths
  B: the tokens each row generated, its stop token included)."""
  b, p = prompt_BxP.shape
  max_len = max_len or p + max_new_tokens - 1
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
  if p < 1:
    raise ValueError("the prompt is empty; give at least one token")
  if p + max_new_tokens - 1 > max_len:
    raise ValueError(
        f"prompt of {p} tokens + max_new_tokens={max_new_tokens} needs "
        f"{p + max_new_tokens - 1} cache positions; max_len={max_len}")
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, jnp.asarray(prompt_BxP, jnp.int32),
                   jax.random.key(seed), step, max_new_tokens=max_new_tokens,
                   max_len=max_len, sampling=sampling)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens",
                                             "max_len", "sampling"))
def _generate(graphdef, state, prompt_BxP, key, step, *, max_new_tokens,
              max_len, sampling):
  model = nnx.merge(graphdef, state)
  b = prompt_BxP.shape[0]
  logits_BxPxV, cache = model.prefill(prompt_BxP, model.init_cache(b, max_len),
                                      step)
  vocab = logits_BxPxV.shape[-1]
  stop = sampling.stop_token
  if stop is not None and stop >= vocab:
    raise ValueError(f"stop_token={stop} must be below the vocabulary size "
                     f"{vocab}")
  if sampling.top_k > vocab:
    raise ValueError(f"top_k={sampling.top_k} exceeds the vocabulary size "
                     f"{vocab}")
  fill = 0 if stop is None else stop
  first_B = choose(logits_BxPxV[:, -1], jax.random.fold_in(key, 0), sampling)
  tokens_BxN = jnp.full((b, max_new_tokens), fill, jnp.int32).at[:, 0].set(
      first_B)
  done_B = jnp.zeros(b, bool) if stop is None else first_B == stop

  def unfinished(carry):
    i, _, _, done_B = carry
    return (i < max_new_tokens) & ~done_B.all()

  def next_token(carry):
    i, cache, tokens_BxN, done_B = carry
    logits_BxV, cache = model.decode_step(tokens_BxN[:, i - 1], cache, step)
    new_B = jnp.where(done_B, fill,
                      choose(logits_BxV, jax.random.fold_in(key, i),
                             sampling))
    tokens_BxN = jax.lax.dynamic_update_slice_in_dim(tokens_BxN,
                                                     new_B[:, None], i, 1)
    if stop is not None:
      done_B = done_B | (new_B == stop)
    return i + 1, cache, tokens_BxN, done_B

  count, _, tokens_BxN, _ = jax.lax.while_loop(
      unfinished, next_token, (jnp.int32(1), cache, tokens_BxN, done_B))
  if stop is None:
    return tokens_BxN, jnp.full((b,), count)
  stopped_BxN = tokens_BxN == stop
  lengths_B = jnp.where(stopped_BxN.any(-1), jnp.argmax(stopped_BxN, -1) + 1,
                        count)
  return tokens_BxN, lengths_B
