"""Shared layers: projection init follows each kernel's true fan-in."""

import numpy as np
import pytest
from flax import nnx

from zoo import registry
from zoo.layers import MultiHeadAttention

D = 256


@pytest.mark.parametrize("heads", [1, 4, 16])
@pytest.mark.parametrize("grouped", [False, True])
def test_projection_init_has_fan_in_of_its_input(heads, grouped):
  """q, k, v (DxHxK) start with std 1/sqrt(D) whatever the head counts, the
  output projection (HxKxD) with 1/sqrt(H*K): the variance of an
  activation then does not depend on H or on grouped-query attention."""
  kv_heads = 1 if grouped else heads
  layer = MultiHeadAttention(
      embed_dim=D, num_heads=heads, num_kv_heads=kv_heads,
      op=registry.build("attention", "standard"), causal=True,
      rngs=nnx.Rngs(0))
  head_dim = D // heads
  for name, fan_in in (("query", D), ("key", D), ("value", D),
                       ("out", heads * head_dim)):
    std = float(np.std(np.asarray(getattr(layer, name).kernel[...])))
    assert abs(std * np.sqrt(fan_in) - 1) < 0.1, (name, std, fan_in)
