"""Sparse attention computed on blocks: the Sparse Transformer's strided and
fixed patterns (Child et al. 2019) and BigBird's global + window + random
blocks (Zaheer et al. 2020).

The sequence is cut into blocks of `block` positions (padded up internally).
A pattern is a union of disjoint parts (a band of neighbouring blocks,
strided columns, summary positions, gathered blocks); each part gathers only
the keys it covers, so every visible key is counted once, and the parts'
softmax terms are merged by their maxima and sums as in blockwise attention.
Cost grows with the keys a query sees, never with a dense T x S matrix. Both
ops need q_len == kv_len. Both run all blocks at once (running them a few
at a time, as local attention does, was slower inside the LM; see
experiments/results/attention_cost/RESULTS.md).

Decoding keeps the base class's KV cache; a query at position p sees its
row of the causal pattern at the cache's capacity C, `allows(p, j, t=C)`,
held as an index of distinct tiles (no C x C array). Both patterns are
prefix-consistent (row i depends only on i and the rows before it; BigBird
draws row i's random blocks after the rows above), so the pattern at C
agrees with the training length's on their common rows and prefill +
decode equals the forward pass. Decoding reads the whole cache under the
row: the budget saves training compute, not decode compute.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from zoo import registry
from zoo.attention.base import AttentionOp


def _to_blocks(name, q, k, v, mask, block):
  """Pads the length to N x L (L = block) and splits it into blocks.

  Returns q BxNxLxGxRxK (fp32, scaled by 1/sqrt(K)), k and v BxNxLxGxK
  (fp32), and valid_BxNxL: True on real, unmasked keys.
  """
  b, t, h, d = q.shape
  s, g = k.shape[1], k.shape[2]
  if s != t:
    raise ValueError(
        f"attention {name} needs q_len == kv_len; got {t} and {s}")
  n = -(-t // block)
  pad = ((0, 0), (0, n * block - t), (0, 0), (0, 0))
  q = jnp.pad(q.astype(jnp.float32) / np.sqrt(d), pad)
  k, v = (jnp.pad(a.astype(jnp.float32), pad).reshape(b, n, block, g, d)
          for a in (k, v))
  valid_BxS = jnp.ones((b, t), bool) if mask is None else mask
  valid_BxNxL = jnp.pad(valid_BxS, ((0, 0), (0, n * block - t)))
  return (q.reshape(b, n, block, g, h // g, d), k, v,
          valid_BxNxL.reshape(b, n, block))


def _from_blocks(out_BxNxLxGxRxK, t, dtype):
  b, n, l, g, r, d = out_BxNxLxGxRxK.shape
  return out_BxNxLxGxRxK.reshape(b, n * l, g * r, d)[:, :t].astype(dtype)


def _part(q, k, v, keys, allowed, bias, query="bnlgrk"):
  """Softmax terms of one part of a pattern.

  `query` and `keys` give q's and k's (v's) layouts in einsum letters, with
  m the key axis (keys `bnmgk`: keys per query block; `bmlgk`: strided
  columns; `bmgk`: keys shared by all queries). `allowed` and `bias`
  broadcast to the logits (q's layout with m for its last letter). Returns
  the unnormalised output (q's layout), the max and the sum of
  exp(logit - max) (max is -inf where no key is allowed).
  """
  scores = query[:-1] + "m"
  logits = jnp.einsum(f"{query},{keys}->{scores}", q, k)
  if bias is not None:
    logits = logits + bias
  logits = jnp.where(allowed, logits, -jnp.inf)
  top = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
  weights = jnp.exp(logits - jnp.where(jnp.isfinite(top), top, 0.0)[..., None])
  out = jnp.einsum(f"{scores},{keys}->{query}", weights, v)
  return out, top, jnp.sum(weights, axis=-1)


def _merge(*parts):
  """One softmax over the union of disjoint parts; zero where none has a key."""
  top = parts[0][1]
  for _, part_top, _ in parts[1:]:
    top = jnp.maximum(top, part_top)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  num, den = 0.0, 0.0
  for out, part_top, total in parts:
    scale = jnp.exp(part_top - top)
    num = num + scale[..., None] * out
    den = den + scale * total
  return num / jnp.where(den > 0, den, 1.0)[..., None]


def _block_bias(bias, q_pos_AxX, k_pos_AxY, perm, g):
  """`bias` evaluated per row A of positions, AxHxXxY, transposed by `perm`
  to NxLxHxM and split to NxLxGxRxM (broadcasts over batch)."""
  bias_AxHxXxY = jax.vmap(bias)(jnp.asarray(q_pos_AxX), jnp.asarray(k_pos_AxY))
  out_NxLxHxM = jnp.transpose(bias_AxHxXxY.astype(jnp.float32), perm)
  n, l, h, m = out_NxLxHxM.shape
  return out_NxLxHxM.reshape(n, l, g, h // g, m)


def _shifted(x_BxNxL, offsets):
  """Concatenates blocks n + o for o in offsets along axis 2, zero (False)
  beyond the ends: the keys of neighbouring blocks, BxNx(len(offsets)*L)."""
  n = x_BxNxL.shape[1]
  parts = []
  for o in offsets:
    pad = [(0, 0)] * x_BxNxL.ndim
    pad[1] = (max(-o, 0), max(o, 0))
    parts.append(jnp.pad(x_BxNxL, pad)[:, max(o, 0):max(o, 0) + n])
  return jnp.concatenate(parts, axis=2)


@registry.register("attention", "sparse")
@dataclasses.dataclass(frozen=True)
class Sparse(AttentionOp):
  """Sparse Transformer patterns (Child et al. 2019) on blocks of l = block.

  Query i sees key j (positions 0..T-1, T == S) when, for pattern
  - "strided": i - j < l (the l most recent positions, i itself included)
    or (i - j) % l == 0 (every l-th position: the strided column);
  - "fixed": i // l == j // l (the same block) or j % l >= l - summary (the
    last `summary` positions of every block).
  Causal keeps the pairs with j <= i; bidirectional is the symmetric
  pattern: |i - j| < l or (i - j) % l == 0 for strided, and the same block or
  any block's summary positions for fixed. Keys computed per query: strided
  2l + T/l (3l + T/l bidirectional), fixed l + summary * T/l. The column and
  summary parts grow as T/l, so cost is T x (l + T/l): T^1.5 at l ~ sqrt(T),
  and T^2 / l at a fixed l once T/l outgrows l.
  """

  pattern: str = "strided"
  block: int = 64
  summary: int = 8

  def __post_init__(self):
    if self.pattern not in ("strided", "fixed"):
      raise ValueError(
          f"attention sparse(pattern=...) must be 'strided' or 'fixed'; "
          f"got {self.pattern!r}")
    if self.block < 1:
      raise ValueError(
          f"attention sparse(block=...) must be >= 1; got {self.block}")
    if self.pattern == "fixed" and not 1 <= self.summary <= self.block:
      raise ValueError(
          f"attention sparse(summary=...) must be in 1..block={self.block}; "
          f"got {self.summary}")

  def allows(self, i, j, *, t, causal, num_heads):
    del t, num_heads
    l = self.block
    if self.pattern == "strided":
      ok = (np.abs(i - j) < l) | ((i - j) % l == 0)
    else:
      ok = (i // l == j // l) | (j % l >= l - self.summary)
    return (ok & (j <= i) if causal else ok)[None]

  def cache_rows(self, positions_T, capacity, num_heads):
    return pattern_rows(self, positions_T, capacity, num_heads)

  def attend(self, q, k, v, *, causal, mask, bias):
    q_BxNxLxGxRxK, k_BxNxLxGxK, v_BxNxLxGxK, valid_BxNxL = _to_blocks(
        "sparse", q, k, v, mask, self.block)
    _, n, l, g, _, _ = q_BxNxLxGxRxK.shape
    pos_NxL = np.arange(n * l).reshape(n, l)
    blocks_n = np.arange(n)
    # Key blocks m seen through the column / summary part by query block n.
    other_NxN = (blocks_n[None, :] < blocks_n[:, None] if causal
                 else blocks_n[None, :] != blocks_n[:, None])

    # The band: neighbouring blocks' keys, masked to the local rule.
    if self.pattern == "strided":
      offsets = (-1, 0) if causal else (-1, 0, 1)
    else:
      offsets = (0,)
    k_pos_NxM = np.concatenate([pos_NxL + o * l for o in offsets], axis=1)
    rel_NxLxM = pos_NxL[:, :, None] - k_pos_NxM[:, None, :]
    if self.pattern == "strided":
      near_NxLxM = (rel_NxLxM < l) & (rel_NxLxM >= 0 if causal
                                      else rel_NxLxM > -l)
    else:
      near_NxLxM = rel_NxLxM >= 0 if causal else np.ones_like(rel_NxLxM, bool)
    allowed = near_NxLxM[None] & _shifted(valid_BxNxL, offsets)[:, :, None]
    band = _part(
        q_BxNxLxGxRxK, _shifted(k_BxNxLxGxK, offsets),
        _shifted(v_BxNxLxGxK, offsets), "bnmgk",
        allowed[:, :, :, None, None],
        None if bias is None else _block_bias(bias, pos_NxL, k_pos_NxM,
                                              (0, 2, 1, 3), g))

    if self.pattern == "strided":
      # The strided column: key (m, l) for query (n, l), every block m but
      # the query's own (that key is i itself, in the band; no other column
      # key is).
      # Laid out with the batch axes (b, l, g) first, so the two products
      # run as batched matmuls: in q's layout XLA:CPU fused them into
      # elementwise loops.
      allowed_BxLxNxM = (other_NxN[None, None]
                         & jnp.transpose(valid_BxNxL, (0, 2, 1))[:, :, None])
      out, top, total = _part(
          q_BxNxLxGxRxK.transpose(0, 2, 3, 1, 4, 5),
          k_BxNxLxGxK.transpose(0, 2, 3, 1, 4),
          v_BxNxLxGxK.transpose(0, 2, 3, 1, 4), "blgmk",
          allowed_BxLxNxM[:, :, None, :, None],
          None if bias is None else _block_bias(
              bias, pos_NxL.T, pos_NxL.T, (2, 0, 1, 3), g).transpose(
                  1, 2, 0, 3, 4), query="blgnrk")
      far = (out.transpose(0, 3, 1, 2, 4, 5), top.transpose(0, 3, 1, 2, 4),
             total.transpose(0, 3, 1, 2, 4))
    else:
      # The summary positions of every other block (the own block's are in
      # the band).
      c = self.summary
      k_BxNCxGxK, v_BxNCxGxK = (
          a[:, :, l - c:].reshape(a.shape[0], n * c, g, -1)
          for a in (k_BxNxLxGxK, v_BxNxLxGxK))
      summary_pos_NC = pos_NxL[:, l - c:].reshape(-1)
      allowed_NxNC = np.repeat(other_NxN, c, axis=1)
      allowed = (allowed_NxNC[None, :, None, :]
                 & valid_BxNxL[:, :, l - c:].reshape(-1, 1, 1, n * c))
      far = _part(
          q_BxNxLxGxRxK, k_BxNCxGxK, v_BxNCxGxK, "bmgk",
          allowed[:, :, :, None, None],
          None if bias is None else _block_bias(
              bias, pos_NxL.reshape(1, -1), summary_pos_NC[None],
              (0, 2, 1, 3), g).reshape(n, l, g, -1, n * c))
    return _from_blocks(_merge(band, far), q.shape[1], q.dtype)


@registry.register("attention", "bigbird")
@dataclasses.dataclass(frozen=True)
class BigBird(AttentionOp):
  """BigBird block-sparse attention (Zaheer et al. 2020, the ITC form) on
  blocks of `block` positions; `block_layout` gives each head's NxN block
  pattern.

  Bidirectional: the global blocks are the first ceil(num_global / 2) and the
  last floor(num_global / 2) blocks (ITC's first and last); every query
  block sees them and their queries see every block. Query block n also sees
  the window n - (num_window - 1) // 2 .. n + num_window // 2 and num_random
  blocks drawn without replacement from the rest (fewer when fewer remain).
  Causal: query block n sees the leading global blocks at or below n (a
  trailing global block lies in every other query's future, so causal runs
  drop it), the window n - num_window + 1 .. n, and num_random blocks drawn
  from the rest of blocks 0..n-1; inside the diagonal block, keys j <= i.
  Random blocks are drawn per layer and per head, as in the paper: numpy's
  default_rng((seed, layer, head)), row by row, at trace time. Defaults are
  the paper's (2 global, 3 window, 3 random blocks). With a bias, each
  head's gathered blocks evaluate the bias of every head (H-fold work on the
  bias only).
  """

  block: int = 64
  num_global: int = 2
  num_window: int = 3
  num_random: int = 3
  seed: int = 0
  layer: int = 0

  def __post_init__(self):
    for name, low in (("block", 1), ("num_global", 0), ("num_window", 1),
                      ("num_random", 0), ("seed", 0)):
      if getattr(self, name) < low:
        raise ValueError(
            f"attention bigbird({name}=...) must be >= {low}; "
            f"got {getattr(self, name)}")

  def global_blocks(self, num_blocks: int, causal: bool) -> np.ndarray:
    """Indices of the global blocks (see the class docstring)."""
    lead = min(-(-self.num_global // 2), num_blocks)
    trail = 0 if causal else min(self.num_global // 2, num_blocks - lead)
    return np.concatenate([np.arange(lead),
                           np.arange(num_blocks - trail, num_blocks)])

  def block_layout(self, num_blocks: int, causal: bool,
                   num_heads: int = 1) -> np.ndarray:
    """HxNxN bool: which key blocks each head's query blocks attend."""
    return _bigbird_layout(self, num_blocks, causal, num_heads)

  def allows(self, i, j, *, t, causal, num_heads):
    l = self.block
    layout_HxNxN = self.block_layout(-(-t // l), causal, num_heads)
    ok = layout_HxNxN[:, i // l, j // l]
    return ok & (j <= i) if causal else ok

  def cache_rows(self, positions_T, capacity, num_heads):
    return pattern_rows(self, positions_T, capacity, num_heads)

  def attend(self, q, k, v, *, causal, mask, bias):
    q_BxNxLxGxRxK, k_BxNxLxGxK, v_BxNxLxGxK, valid_BxNxL = _to_blocks(
        "bigbird", q, k, v, mask, self.block)
    b, n, l, g, r, d = q_BxNxLxGxRxK.shape
    h = g * r
    pos_NxL = np.arange(n * l).reshape(n, l)
    layout_HxNxN = self.block_layout(n, causal, h)
    # Bidirectional global query blocks see every key: a dense part.
    dense_rows = np.array([], int) if causal else self.global_blocks(n, False)
    rows = np.setdiff1d(np.arange(n), dense_rows)
    outs = []
    if dense_rows.size:
      q_pos = pos_NxL[dense_rows].reshape(1, -1)
      allowed = valid_BxNxL.reshape(b, 1, 1, 1, 1, n * l)
      outs.append(_merge(_part(
          q_BxNxLxGxRxK[:, dense_rows], k_BxNxLxGxK.reshape(b, n * l, g, d),
          v_BxNxLxGxK.reshape(b, n * l, g, d), "bmgk", allowed,
          None if bias is None else _block_bias(
              bias, q_pos, pos_NxL.reshape(1, -1), (0, 2, 1, 3), g).reshape(
                  dense_rows.size, l, g, -1, n * l))))
    if rows.size:
      outs.append(self._gathered(
          q_BxNxLxGxRxK[:, rows], k_BxNxLxGxK, v_BxNxLxGxK, valid_BxNxL,
          layout_HxNxN[:, rows], pos_NxL[rows], causal, bias))
    order = np.concatenate([dense_rows, rows])
    out_BxNxLxGxRxK = jnp.concatenate(outs, axis=1)[:, np.argsort(order)]
    return _from_blocks(out_BxNxLxGxRxK, q.shape[1], q.dtype)

  def _gathered(self, q_BxNxLxGxRxK, k_BxNxLxGxK, v_BxNxLxGxK, valid_BxNxL,
                layout_HxNxN, q_pos_NxL, causal, bias):
    """Each head's query blocks against the key blocks its layout row
    names (gathered per head: random blocks differ between heads)."""
    b, n, l, g, r, d = q_BxNxLxGxRxK.shape
    h = g * r
    width = layout_HxNxN.sum(-1).max()
    idx_HxNxW = np.zeros((h, n, width), int)
    used_HxNxW = np.zeros((h, n, width), bool)
    for head in range(h):
      for i, row in enumerate(layout_HxNxN[head]):
        cols = np.flatnonzero(row)
        idx_HxNxW[head, i, :cols.size] = cols
        used_HxNxW[head, i, :cols.size] = True
    kv_head_H = np.arange(h) // r
    k_pos_HxNxM = (idx_HxNxW[..., None] * l + np.arange(l)).reshape(h, n, -1)
    ok_HxNxLxM = np.repeat(used_HxNxW, l, axis=2)[:, :, None, :]
    if causal:
      ok_HxNxLxM = ok_HxNxLxM & (k_pos_HxNxM[:, :, None, :]
                                 <= q_pos_NxL[None, :, :, None])
    valid_BxHxNx1xM = valid_BxNxL[:, idx_HxNxW].reshape(b, h, n, 1, -1)
    k_BxHxNxMxK, v_BxHxNxMxK = (
        a.transpose(0, 3, 1, 2, 4)[:, kv_head_H[:, None, None], idx_HxNxW]
        .reshape(b, h, n, width * l, d) for a in (k_BxNxLxGxK, v_BxNxLxGxK))
    q_BxHxNxLxK = q_BxNxLxGxRxK.transpose(0, 3, 4, 1, 2, 5).reshape(
        b, h, n, l, d)
    bias_HxNxLxM = None
    if bias is not None:
      per_head = lambda head, q_pos, k_pos: bias(q_pos, k_pos)[head]
      bias_HxNxLxM = jax.vmap(jax.vmap(per_head, (None, 0, 0)), (0, None, 0))(
          jnp.arange(h), jnp.asarray(q_pos_NxL), jnp.asarray(k_pos_HxNxM)
      ).astype(jnp.float32)
    out_BxHxNxLxK = _merge(_part(
        q_BxHxNxLxK, k_BxHxNxMxK, v_BxHxNxMxK, "bhnmk",
        ok_HxNxLxM[None] & valid_BxHxNx1xM, bias_HxNxLxM, query="bhnlk"))
    return out_BxHxNxLxK.reshape(b, g, r, n, l, d).transpose(0, 3, 4, 1, 2, 5)


@functools.cache
def _bigbird_layout(op: BigBird, n: int, causal: bool, num_heads: int
                    ) -> np.ndarray:
  """HxNxN block layout of `op` (cached: `allows` asks for it per chunk)."""
  glob = op.global_blocks(n, causal)
  layouts = np.zeros((num_heads, n, n), bool)
  for head, layout in enumerate(layouts):
    rng = np.random.default_rng((op.seed, op.layer, head))
    layout[:, glob] = True
    if not causal:
      layout[glob] = True
    for i in range(n):
      if causal:
        layout[i, max(i - op.num_window + 1, 0):i + 1] = True
        free = np.flatnonzero(~layout[i, :i])
      else:
        low = i - (op.num_window - 1) // 2
        layout[i, max(low, 0):low + op.num_window] = True
        free = np.flatnonzero(~layout[i])
      picks = min(op.num_random, free.size)
      if picks:
        layout[i, rng.choice(free, picks, replace=False)] = True
    if causal:
      layout &= np.tri(n, dtype=bool)
  layouts.flags.writeable = False
  return layouts


def pattern_rows(op: AttentionOp, positions_T, capacity: int, num_heads: int):
  """1xTxC or HxTxC bool: the causal rows at `positions_T` (traced) of
  `op`'s pattern at length `capacity`, gathered from `pattern_tiles`."""
  index_HxNxN, tiles_UxLxL = pattern_tiles(op, capacity, num_heads, op.block)
  l = tiles_UxLxL.shape[1]
  ids_HxTxN = jnp.asarray(index_HxNxN)[:, positions_T // l]
  rows_HxTxNxL = jnp.asarray(tiles_UxLxL)[ids_HxTxN,
                                          (positions_T % l)[None, :, None]]
  h, t = rows_HxTxNxL.shape[:2]
  return rows_HxTxNxL.reshape(h, t, -1)[:, :, :capacity]


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
