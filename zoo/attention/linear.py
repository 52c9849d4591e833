"""Linear attention: the softmax kernel exp(q.k) replaced by a feature map,
phi(q).phi(k), so attention reassociates to phi(q) (sum_s phi(k_s) v_s^T)
and costs T x F x K instead of T x S x K (Katharopoulos et al. 2020; Performer
FAVOR+, Choromanski et al. 2021).

Causal attention runs in chunks: the masked quadratic form inside a chunk,
and across chunks the state sum phi(k) v^T and normaliser sum phi(k) of all
earlier chunks, carried by a lax.scan over chunks, so time is linear in T.
`step` is the same computation as a recurrence over that fixed-size state:
the RNN view, for decoding. An additive position bias cannot enter a feature
map, so this op takes none.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from zoo import registry
from zoo.attention.base import AttentionOp, group_queries


def _normalise(num, den):
  """num / den, zero where no key contributed (den == 0)."""
  return num / jnp.where(den > 0, den, 1.0)[..., None]


@registry.register("attention", "linear")
@dataclasses.dataclass(frozen=True)
class Linear(AttentionOp):
  """Kernel linear attention, out_t = phi(q_t).S / phi(q_t).z with
  S = sum phi(k_s) v_s^T and z = sum phi(k_s) over the visible keys.

  feature "elu": phi(x) = elu(x) + 1, F = head_dim (num_features and seed
  are unused). "favor": Performer's positive random features
  phi(x) = exp(w x - |x|^2 / 2) / sqrt(F) of x = head vector * head_dim**-0.25,
  with F = num_features rows w of orthogonal Gaussian blocks
  (`projection`), an unbiased estimate of the softmax kernel. `chunk` is the
  causal chunk length.
  """

  feature: str = "elu"
  num_features: int = 64
  chunk: int = 64
  seed: int = 0
  positions = frozenset({"none", "absolute", "rotary"})

  def __post_init__(self):
    if self.feature not in ("elu", "favor"):
      raise ValueError(
          f"attention linear(feature=...) must be 'elu' or 'favor'; "
          f"got {self.feature!r}")
    for name in ("num_features", "chunk"):
      if getattr(self, name) < 1:
        raise ValueError(
            f"attention linear({name}=...) must be >= 1; "
            f"got {getattr(self, name)}")
    if self.seed < 0:
      raise ValueError(
          f"attention linear(seed=...) must be >= 0; got {self.seed}")

  def feature_dim(self, head_dim: int) -> int:
    """F, the size of phi(x) for head vectors of size head_dim."""
    return head_dim if self.feature == "elu" else self.num_features

  def projection(self, head_dim: int) -> np.ndarray:
    """FAVOR+ projection FxK: blocks of K orthonormal rows, each row
    rescaled to the norm of a Gaussian vector, so every row is Gaussian.
    The blocks are Haar-random: Q of a Gaussian matrix's QR with the signs
    of R's diagonal folded in (LAPACK's Q alone is biased)."""
    rng = np.random.default_rng(self.seed)
    f = self.num_features
    blocks = []
    for _ in range(-(-f // head_dim)):
      q_KxK, r_KxK = np.linalg.qr(rng.standard_normal((head_dim, head_dim)))
      blocks.append((q_KxK * np.sign(np.diag(r_KxK))).T)
    norms_F = np.linalg.norm(rng.standard_normal((f, head_dim)), axis=1)
    return (np.concatenate(blocks)[:f] * norms_F[:, None]).astype(np.float32)

  def features(self, x_xK, *, query: bool = False):
    """phi(x) in fp32, ...xK -> ...xF, positive. For queries, FAVOR+
    divides by the largest feature of each vector, a factor that cancels
    between numerator and normaliser."""
    x = x_xK.astype(jnp.float32)
    if self.feature == "elu":
      return jax.nn.elu(x) + 1.0
    d = x.shape[-1]
    x = x * d**-0.25
    w_FxK = jnp.asarray(self.projection(d))
    logits = x @ w_FxK.T - jnp.sum(x * x, axis=-1, keepdims=True) / 2
    if query:
      logits = logits - jax.lax.stop_gradient(
          jnp.max(logits, axis=-1, keepdims=True))
    return jnp.exp(logits) / np.sqrt(self.num_features)

  def attend(self, q, k, v, *, causal, mask, bias):
    b, t, h, d = q.shape
    s, g = k.shape[1], k.shape[2]
    phi_q_BxTxGxRxF = self.features(group_queries(q, g), query=True)
    phi_k_BxSxGxF = self.features(k)
    if mask is not None:
      phi_k_BxSxGxF = jnp.where(mask[:, :, None, None], phi_k_BxSxGxF, 0.0)
    v_BxSxGxK = v.astype(jnp.float32)
    if causal:
      out = self._causal(phi_q_BxTxGxRxF, phi_k_BxSxGxF, v_BxSxGxK)
    else:
      state_BxGxFxK = jnp.einsum("bsgf,bsgk->bgfk", phi_k_BxSxGxF, v_BxSxGxK)
      z_BxGxF = jnp.sum(phi_k_BxSxGxF, axis=1)
      out = _normalise(
          jnp.einsum("btgrf,bgfk->btgrk", phi_q_BxTxGxRxF, state_BxGxFxK),
          jnp.einsum("btgrf,bgf->btgr", phi_q_BxTxGxRxF, z_BxGxF))
    return out.reshape(b, t, h, d).astype(q.dtype)

  def _causal(self, phi_q_BxTxGxRxF, phi_k_BxSxGxF, v_BxSxGxK):
    """Chunked causal form; query i sits at key position S - T + i."""
    t, s = phi_q_BxTxGxRxF.shape[1], phi_k_BxSxGxF.shape[1]
    # Align the ends: extra leading queries (S > T) are dropped afterwards,
    # extra leading keys (T > S) have phi = 0 and v = 0. Then pad the common
    # length u to whole chunks.
    u = max(t, s)
    c = min(self.chunk, u)
    n = -(-u // c)

    def chunks(x, front):
      pad = [(0, 0)] * x.ndim
      pad[1] = (front, n * c - u)
      x = jnp.pad(x, pad)
      return x.reshape(x.shape[0], n, c, *x.shape[2:])

    phi_q_BxNxCxGxRxF = chunks(phi_q_BxTxGxRxF, u - t)
    phi_k_BxNxCxGxF = chunks(phi_k_BxSxGxF, u - s)
    v_BxNxCxGxK = chunks(v_BxSxGxK, u - s)
    # Inside a chunk: the quadratic form, lower-triangular.
    tri_CxC = jnp.tril(jnp.ones((c, c), jnp.float32))
    a_BxNxCxGxRxC = jnp.einsum("bncgrf,bnegf->bncgre", phi_q_BxNxCxGxRxF,
                               phi_k_BxNxCxGxF) * tri_CxC[:, None, None, :]
    num_BxNxCxGxRxK = jnp.einsum("bncgre,bnegk->bncgrk", a_BxNxCxGxRxC,
                                 v_BxNxCxGxK)
    den_BxNxCxGxR = jnp.sum(a_BxNxCxGxRxC, axis=-1)
    # Across chunks: the state and normaliser of all earlier chunks.
    state_BxNxGxFxK, z_BxNxGxF = _before_each_chunk(
        (jnp.einsum("bncgf,bncgk->bngfk", phi_k_BxNxCxGxF, v_BxNxCxGxK),
         jnp.sum(phi_k_BxNxCxGxF, axis=2)))
    num_BxNxCxGxRxK += jnp.einsum("bncgrf,bngfk->bncgrk", phi_q_BxNxCxGxRxF,
                                  state_BxNxGxFxK)
    den_BxNxCxGxR += jnp.einsum("bncgrf,bngf->bncgr", phi_q_BxNxCxGxRxF,
                                z_BxNxGxF)
    out = _normalise(num_BxNxCxGxRxK, den_BxNxCxGxR)
    return out.reshape(out.shape[0], n * c, *out.shape[3:])[:, u - t:u]

  def init_state(self, batch: int, heads: int, feature_dim: int,
                 head_dim: int):
    """Zero recurrent state (S BxGxFxK, z BxGxF); heads are kv heads G and
    feature_dim is `feature_dim(head_dim)`."""
    return (jnp.zeros((batch, heads, feature_dim, head_dim), jnp.float32),
            jnp.zeros((batch, heads, feature_dim), jnp.float32))

  def step(self, state, q_BxHxK, k_BxGxK, v_BxGxK):
    """One causal decoding step: adds key t to the state, then attends query
    t. Returns (state, out_BxHxK); the same output as the causal op."""
    state_BxGxFxK, z_BxGxF = state
    b, h, d = q_BxHxK.shape
    g = k_BxGxK.shape[1]
    phi_k_BxGxF = self.features(k_BxGxK)
    state_BxGxFxK = state_BxGxFxK + (
        phi_k_BxGxF[..., None] * v_BxGxK.astype(jnp.float32)[:, :, None, :])
    z_BxGxF = z_BxGxF + phi_k_BxGxF
    phi_q_BxGxRxF = self.features(q_BxHxK.reshape(b, g, h // g, d),
                                  query=True)
    out = _normalise(
        jnp.einsum("bgrf,bgfk->bgrk", phi_q_BxGxRxF, state_BxGxFxK),
        jnp.einsum("bgrf,bgf->bgr", phi_q_BxGxRxF, z_BxGxF))
    return (state_BxGxFxK, z_BxGxF), out.reshape(b, h, d).astype(q_BxHxK.dtype)


def _before_each_chunk(sums):
  """For each array BxNx... of per-chunk sums, the sum over the chunks
  before each chunk (zero for the first): the carried state of a lax.scan
  over chunks. (jnp.cumsum lowers to a reduce-window, quadratic in N on
  CPU.)"""

  def add(total, x):
    total_next = jax.tree.map(jnp.add, total, x)
    return total_next, total

  xs = jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), sums)
  _, before = jax.lax.scan(
      add, jax.tree.map(lambda a: jnp.zeros_like(a[0]), xs), xs)
  return jax.tree.map(lambda a: jnp.moveaxis(a, 0, 1), before)
