"""The sampler: a decoder LM's prompt prefilled in one call, then tokens
drawn one at a time from its decode steps, all in one compiled program
(as flax's lm1b keeps temperature_sampler.py beside its model).

Each layer decodes through its attention op's own state (KV cache, ring
buffer, recurrent state; see zoo/attention/base.py), so the sampler knows
no family.
"""

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


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
             max_len: Optional[int] = None):
  """Samples up to `max_new_tokens` tokens after each prompt row with a
  decoder LM (`init_cache`, `prefill`, `decode_step`): one compiled program,
  the prompt prefilled in one call and the tokens drawn in a
  `lax.while_loop` that ends when every row has emitted the stop token.
  `max_len` (default prompt + max_new_tokens - 1, the positions fed) is the
  cache's capacity. Returns (tokens BxN int32, the stop token after a row's end, and lengths
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
                   jax.random.key(seed), max_new_tokens=max_new_tokens,
                   max_len=max_len, sampling=sampling)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens",
                                             "max_len", "sampling"))
def _generate(graphdef, state, prompt_BxP, key, *, max_new_tokens,
              max_len, sampling):
  model = nnx.merge(graphdef, state)
  b = prompt_BxP.shape[0]
  logits_BxPxV, cache = model.prefill(prompt_BxP, model.init_cache(b, max_len))
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
    logits_BxV, cache = model.decode_step(tokens_BxN[:, i - 1], cache)
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
