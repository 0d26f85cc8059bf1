"""RMSNorm, computed as transformers computes it (float32 statistics, cast back, then scale)."""

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x: [..., D]; weight: [D]. The product with `weight` happens in x's dtype, as in HF, so bf16
    runs round where transformers rounds."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)
