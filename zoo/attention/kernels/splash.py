"""Accelerator kernels for the softmax attention patterns: Pallas splash
attention on TPU, Pallas flash attention and cuDNN on GPU.

One op, `splash(like=SPEC, ...)`, runs the pattern of another registered op
(standard, local, sparse or bigbird) on the device's kernel. The pattern has
one definition, the pattern op's `allows`: the splash kernel's block-sparse
mask is evaluated from it block by block when the kernel is built (at trace
time), so a new pattern, or a change to one, reaches the kernel unchanged.
Where no kernel computes the pattern (a sparse pattern on GPU, any pattern on
CPU, q_len != kv_len), the pattern op itself runs: the same function, blocked
XLA, with a logged warning.

Pallas is imported only where a kernel is built or run, so that importing
the op (every `import zoo.attention` does) loads no Pallas: CPU programs
never touch it.

Shapes: B batch, T length (Tp padded to the kernel's blocks), H heads, G kv
heads, K head dim.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from zoo import registry
from zoo.attention.base import AttentionOp
from zoo.attention.dense import Xla
from zoo.attention.kernels import placement

# Ops whose pattern the kernels reproduce (softmax over a set of keys).
PATTERNS = ("standard", "local", "sparse", "bigbird")
# Kernel -> the device it compiles for; None picks by device (see `choose`).
IMPLEMENTATIONS = {"splash": "tpu", "flash": "gpu", "cudnn": "gpu"}
# Splash blocks are multiples of the TPU's 128 lanes (interpret mode too: the
# kernel's padding-mask path tiles segment ids by lanes).
LANES = 128
# A per-head logit sink well above the kernel's mask value (-0.7 x fp32 max)
# and far below any real logit: a query whose keys are all masked gets
# exactly zero output and gradient (the sink holds the softmax mass and
# contributes no value); any other query's softmax is unchanged.
_SINK = -0.35 * float(np.finfo(np.float32).max)


@registry.register("attention", "splash")
@dataclasses.dataclass(frozen=True)
class Splash(AttentionOp):
  """The pattern of `like` (a spec: standard, local, sparse, bigbird) on an
  accelerator kernel. `implementation`: None picks by device (TPU: splash;
  GPU: cuDNN or Pallas flash for dense attention, else the pattern's own op;
  CPU: the pattern's own op, so a TPU config smoke-tests anywhere), or
  'splash' (TPU), 'flash' (GPU, dense only), 'cudnn' (GPU, dense only, bf16
  or fp16). `interpret=True` runs the splash or flash kernel in Pallas
  interpret mode on any device (slow; for tests). `block_size`: splash's
  query and key block (a multiple of 128, clipped to the padded length).

  Why a spec rather than pattern arguments: the pattern keeps one
  definition (the op's `allows`), BigBird's random blocks stay those of that
  op per layer and head (`for_layer`), and the key budget is the pattern's.
  Grouped-query attention runs through splash's multi-head form, which maps
  query head h to kv head h // (H / G) itself; flash repeats kv heads. The
  kernels take no additive bias, so no bias-kind positions (ALiBi, T5).
  Padding masks: splash by segment ids, cuDNN by its mask; flash takes none.
  """

  like: str = "standard"
  implementation: str | None = None
  interpret: bool = False
  block_size: int = 512
  layer: int = 0
  pattern: AttentionOp = dataclasses.field(init=False, repr=False,
                                           compare=False)

  positions = frozenset({"none", "absolute", "rotary"})

  def __post_init__(self):
    impl = self.implementation
    name = registry.parse(self.like)[0]
    if name not in PATTERNS:
      raise ValueError(
          f"attention splash(like=...) must be the spec of one of "
          f"{', '.join(PATTERNS)}; got {self.like!r}")
    object.__setattr__(self, "pattern", registry.build(
        "attention", self.like).for_layer(self.layer))
    if impl is not None and impl not in IMPLEMENTATIONS:
      raise ValueError(
          f"attention splash(implementation=...) must be None, "
          f"{', '.join(map(repr, IMPLEMENTATIONS))}; got {impl!r}")
    if self.block_size < LANES or self.block_size % LANES:
      raise ValueError(
          f"attention splash(block_size=...) must be a positive multiple of "
          f"{LANES}; got {self.block_size}")
    if self.interpret and impl not in ("splash", "flash"):
      raise ValueError(
          f"attention splash(interpret=True) runs a Pallas kernel: needs "
          f"implementation='splash' or 'flash'; got {impl!r}")
    if impl in ("flash", "cudnn") and name != "standard":
      raise ValueError(
          f"attention splash(implementation={impl!r}) computes dense "
          f"attention only; like={self.like!r} runs on TPU as "
          f"implementation='splash', elsewhere as implementation=None (its "
          f"own op)")
    here = jax.default_backend()
    needs = IMPLEMENTATIONS.get(impl)
    if needs and needs != here and not self.interpret:
      slow = "" if impl == "cudnn" else "interpret=True for a slow check, or "
      raise ValueError(
          f"attention splash(implementation={impl!r}) needs a "
          f"{needs.upper()}; this machine has {here}; use {slow}"
          f"implementation=None (which runs {self.like}'s own op here)")

  def allows(self, i, j, *, t, causal, num_heads):
    return self.pattern.allows(i, j, t=t, causal=causal, num_heads=num_heads)

  def pattern_mask(self, t, causal, num_heads=1):
    return self.pattern.pattern_mask(t, causal, num_heads)

  def keys_per_query(self, t, causal, num_heads=1):
    return self.pattern.keys_per_query(t, causal, num_heads)

  # Decoding: the pattern op's state and steps; a prompt into an empty state
  # runs the splash op itself (the kernel where there is one).
  def init_state(self, batch, capacity, kv_heads, head_dim, dtype):
    return self.pattern.init_state(batch, capacity, kv_heads, head_dim,
                                   dtype)

  def state_size(self, length, kv_heads, head_dim):
    return self.pattern.state_size(length, kv_heads, head_dim)

  def cache_rows(self, positions_T, capacity, num_heads):
    return self.pattern.cache_rows(positions_T, capacity, num_heads)

  def prefill(self, state, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, *, index, bias,
              **gates):
    del gates  # this op takes none (refused by `check`)
    if isinstance(index, int) and index == 0:
      out = self(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, causal=True, bias=bias)
      return out, state.write(k_BxTxGxK, v_BxTxGxK, index)
    return self.pattern.prefill(state, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK,
                                index=index, bias=bias)

  def decode_step(self, state, q_BxHxK, k_BxGxK, v_BxGxK, *, index, bias,
                  **gates):
    del gates  # this op takes none (refused by `check`)
    return self.pattern.decode_step(state, q_BxHxK, k_BxGxK, v_BxGxK,
                                    index=index, bias=bias)

  def attend(self, q, k, v, *, causal, mask, bias):
    del bias  # refused by `check`: not in `positions`
    kernel, note = choose(
        self.implementation, jax.default_backend(),
        registry.parse(self.like)[0], q.dtype, mask is not None,
        q.shape[1] == k.shape[1])
    if note:
      placement.warn_once(f"attention splash(like={self.like!r}): {note}")
    if kernel == "splash":
      return self._splash(q, k, v, causal, mask)
    if kernel == "flash":
      return self._flash(q, k, v, causal)
    if kernel == "cudnn":
      return Xla(implementation="cudnn")(q, k, v, causal=causal, mask=mask)
    return self.pattern(q, k, v, causal=causal, mask=mask)

  def _splash(self, q, k, v, causal, mask):
    from jax.experimental.pallas.ops.tpu import splash_attention
    b, t, h, d = q.shape
    g = k.shape[2]
    block = min(self.block_size, _round_up(t, LANES))
    tp = _round_up(t, block)
    scaled = (q.astype(jnp.float32) * d**-0.5).astype(q.dtype)
    q_BxHxTxK, k_BxGxTxK, v_BxGxTxK = (
        _pad_length(x, tp).transpose(0, 2, 1, 3) for x in (scaled, k, v))
    valid_BxT = None if mask is None else _pad_length(mask, tp)
    mesh, batch, heads = placement.mesh_axes(b, h)
    shards = 1 if mesh is None else placement.size(mesh, heads)
    kernel = _splash_kernel(self.pattern, t, tp, causal, h, block, shards,
                            self.interpret)

    def run(kernel, q_BxHxTxK, k_BxGxTxK, v_BxGxTxK, valid_BxT):
      sinks_H = jnp.full((q_BxHxTxK.shape[1],), _SINK, jnp.float32)

      def one(q_HxTxK, k_GxTxK, v_GxTxK, valid_T):
        segments = None if valid_T is None else splash_attention.SegmentIds(
            q=jnp.ones(valid_T.shape, jnp.int32), kv=valid_T.astype(jnp.int32))
        return kernel(q_HxTxK, k_GxTxK, v_GxTxK, segment_ids=segments,
                      sinks=sinks_H)

      return jax.vmap(one)(q_BxHxTxK, k_BxGxTxK, v_BxGxTxK, valid_BxT)

    if mesh is None:
      out_BxHxTxK = run(kernel, q_BxHxTxK, k_BxGxTxK, v_BxGxTxK, valid_BxT)
    else:
      if g % shards:  # kv heads cannot split like query heads: one per head
        k_BxGxTxK, v_BxGxTxK = (jnp.repeat(x, h // g, axis=1)
                                for x in (k_BxGxTxK, v_BxGxTxK))
      spec = P(batch, heads)
      kernel_spec = kernel.manual_sharding_spec(
          NamedSharding(mesh, P(heads, None)))
      valid_spec = None if valid_BxT is None else P(batch)
      out_BxHxTxK = jax.shard_map(
          run, mesh=mesh, check_vma=False, out_specs=spec,
          in_specs=(kernel_spec, spec, spec, spec, valid_spec))(
              kernel, q_BxHxTxK, k_BxGxTxK, v_BxGxTxK, valid_BxT)
    return out_BxHxTxK.transpose(0, 2, 1, 3)[:, :t].astype(q.dtype)

  def _flash(self, q, k, v, causal):
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention
    b, t, h, d = q.shape
    g = k.shape[2]
    # Triton blocks are powers of two; the default forward block is 128.
    tp = max(16, 1 << (t - 1).bit_length()) if t < LANES else _round_up(
        t, LANES)
    q_BxTxHxK = _pad_length(q, tp)
    k_BxTxHxK, v_BxTxHxK = (jnp.repeat(_pad_length(x, tp), h // g, axis=2)
                            for x in (k, v))
    # Segment ids are shared by queries and keys: they can hide the length
    # padding (real queries see real keys) but not a padding mask.
    segments_BxT = None if tp == t else jnp.broadcast_to(
        (jnp.arange(tp) < t).astype(jnp.int32), (b, tp))

    def run(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, segments_BxT):
      return gpu_attention.mha(
          q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, segments_BxT,
          sm_scale=d**-0.5, causal=causal,
          interpret=self.interpret)

    out_BxTxHxK = placement.shard_heads(
        run, q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, segments_BxT=segments_BxT)
    return out_BxTxHxK[:, :t].astype(q.dtype)


def choose(implementation, platform, pattern, dtype, padded, square):
  """(kernel, note): the kernel a call runs ('splash', 'flash', 'cudnn' or
  'pattern', the pattern op's own XLA code) and why, when it is not the one
  asked for. Refuses calls a chosen kernel cannot honour."""
  half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
  if not square:
    return "pattern", ("q_len != kv_len (decoding): the kernels run "
                       "self-attention; running the pattern's own op")
  if implementation == "flash" and padded:
    raise ValueError(
        "attention splash(implementation='flash') takes no padding mask (the "
        "kernel's segment ids are shared by queries and keys); use "
        "implementation='cudnn' or None")
  if implementation == "cudnn" and not half:
    raise ValueError(
        f"attention splash(implementation='cudnn') needs bfloat16 or float16 "
        f"inputs; got {jnp.dtype(dtype).name} (set model.dtype='bfloat16')")
  if implementation is not None:
    return implementation, ""
  if platform == "tpu":
    return "splash", ""
  if platform == "gpu" and pattern == "standard":
    if half:
      return "cudnn", ""
    if not padded:
      return "flash", ""
    return "pattern", ("on GPU float32 with a padding mask neither cuDNN "
                       "(half precision only) nor flash (no padding mask) "
                       "applies; running the pattern's own op")
  return "pattern", (f"no {pattern} kernel on {platform}; running the "
                     "pattern's own op (XLA, blocked where the pattern is "
                     "sparse)")


@functools.cache
def _pattern_mask_class():
  """The splash mask class of a pattern, made on first use: its base is
  Pallas's, which importing this module must not load."""
  from jax.experimental.pallas.ops.tpu import splash_attention

  class PatternMask(splash_attention.Mask):
    """One head of an op's pattern at length t, padded with False to Tp, as
    a lazy splash mask: the kernel builder asks for blocks, which the op's
    `allows` computes (no TxT array is held)."""

    def __init__(self, op: AttentionOp, t: int, tp: int, causal: bool,
                 num_heads: int, head: int):
      self.key = (op, t, tp, causal, num_heads, head)

    @property
    def shape(self):
      return self.key[2], self.key[2]

    def __getitem__(self, idx):
      op, t, tp, causal, num_heads, head = self.key
      rows, cols = (np.arange(tp)[s] for s in idx)
      real_rows, real_cols = rows[rows < t], cols[cols < t]
      out = np.zeros((rows.size, cols.size), bool)
      allowed = op.allows(real_rows[:, None], real_cols[None, :], t=t,
                          causal=causal, num_heads=num_heads)
      out[:real_rows.size, :real_cols.size] = np.broadcast_to(
          allowed, (len(allowed), real_rows.size, real_cols.size))[head]
      return out

    def __eq__(self, other):
      return isinstance(other, PatternMask) and self.key == other.key

    def __hash__(self):
      return hash(self.key)

  return PatternMask


@functools.lru_cache(maxsize=64)
def _splash_kernel(pattern, t, tp, causal, num_heads, block, head_shards,
                   interpret):
  """The splash kernel of `pattern` at length t padded to Tp (built once per
  layer, length and direction: the mask is processed on the host)."""
  from jax.experimental.pallas.ops.tpu import splash_attention
  pattern_mask = _pattern_mask_class()
  probe = pattern.allows(np.zeros((1, 1), int), np.zeros((1, 1), int), t=t,
                         causal=causal, num_heads=num_heads)
  per_head = probe.shape[0] > 1  # 1xIxJ: one pattern shared by all heads
  masks = [pattern_mask(pattern, t, tp, causal, num_heads,
                        head if per_head else 0) for head in range(num_heads)]
  sizes = splash_attention.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block,
      block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
      block_q_dq=block, block_kv_dq=block)
  with jax.ensure_compile_time_eval():  # concrete mask arrays, reusable
    return splash_attention.make_splash_mha(
        splash_attention.MultiHeadMask(masks), block_sizes=sizes,
        head_shards=head_shards, q_seq_shards=1, interpret=interpret)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _pad_length(x_BxTx_, length):
  """Pads axis 1 with zeros (False) to `length`."""
  pad = [(0, 0), (0, length - x_BxTx_.shape[1])] + [(0, 0)] * (x_BxTx_.ndim - 2)
  return jnp.pad(x_BxTx_, pad)
