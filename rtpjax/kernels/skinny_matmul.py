"""y = x · wᵀ for few rows of x (decode), weights in HF [out, in] layout.

    x  [M, K]   activations (M small: decode tokens of a step)
    w  [N, K]   weights, row-major, each row a contiguous run of K (HF Linear layout); fused
                weights are reshaped by the caller, e.g. w_qkv[K_heads, G+2, H, D] -> [., D]
    y  [M, N]   in out_dtype (default x.dtype), accumulated in float32

GEMM letters M, N, K here, not the glossary's heads. At M <= 64 the product is a stream over w
(Llama-3-8B decode reads 16 GB of weights per step), and XLA's GEMMs stream it at ~80% of copy
bandwidth on an H100; the GPU kernel (skinny_matmul_gpu.py) is written for the stream.

Paths (`impl`): "xla" (ref_skinny_matmul: one einsum with a float32 result, then the cast; the
reference and the CPU path), "gpu" (the Pallas kernel, Triton lowering; off a GPU it runs in Pallas
interpret mode, which the tests use), "auto" ("gpu" on a GPU when skinny_matmul_gpu.supports the
shapes and x, w share a dtype, else "xla"). docs/kernels/skinny_matmul.md has the measurements.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

from rtpjax.kernels import skinny_matmul_gpu as smg

__all__ = ["IMPLS", "ref_skinny_matmul", "resolve_impl", "skinny_matmul", "supports"]

Impl = Literal["auto", "xla", "gpu"]
IMPLS = ("auto", "xla", "gpu")


def supports(m: int, n: int, k: int, dtype: jnp.dtype) -> bool:
    """Whether the GPU kernel covers y[m, n] = x[m, k] · w[n, k]ᵀ in dtype."""
    return smg.supports(m, n, k, dtype)


def validate_inputs(x: jax.Array, w: jax.Array, out_dtype: object, impl: str) -> None:
    """Raise ValueError naming the argument, its value and what is allowed."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} must be one of {IMPLS}")
    if x.ndim != 2:
        raise ValueError(f"x.shape={tuple(x.shape)} must be [M, K] (2-D)")
    if w.ndim != 2:
        raise ValueError(f"w.shape={tuple(w.shape)} must be [N, K] (2-D, HF [out, in] layout)")
    if w.shape[1] != x.shape[1]:
        raise ValueError(
            f"w.shape[1]={w.shape[1]} must equal x.shape[1]={x.shape[1]} (K, the input width; "
            "w is [N, K], HF [out, in] layout)"
        )
    for name, arr in (("x", x), ("w", w)):
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            raise ValueError(f"{name}.dtype={arr.dtype} must be a floating dtype")
    if out_dtype is not None and not jnp.issubdtype(jnp.dtype(out_dtype), jnp.floating):
        raise ValueError(f"out_dtype={jnp.dtype(out_dtype).name} must be a floating dtype")


def ref_skinny_matmul(
    x: jax.Array,  # [M, K]
    w: jax.Array,  # [N, K]
    out_dtype: jnp.dtype | None = None,
) -> jax.Array:  # [M, N] in out_dtype (default x.dtype)
    """The reference (and the "xla" path): one einsum with a float32 result, then the cast."""
    # Full float32 products: on GPU XLA would otherwise use tf32 for float32 operands; 16-bit
    # operands keep the default (the same GEMM the engine runs without the kernel).
    f32 = jnp.float32 in (jnp.dtype(x.dtype), jnp.dtype(w.dtype))
    y = jnp.einsum(
        "MK,NK->MN",
        x,
        w,
        preferred_element_type=jnp.float32,
        precision=lax.Precision.HIGHEST if f32 else None,
    )  # f32[M, N]
    return y.astype(out_dtype or x.dtype)


def _on_gpu() -> bool:
    return jax.default_backend() in ("gpu", "cuda")


def resolve_impl(impl: str, x: jax.Array, w: jax.Array) -> str:
    """The concrete path for `impl` on this backend and these shapes."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} must be one of {IMPLS}")
    if impl != "auto":
        return impl
    (M, K), N = x.shape, w.shape[0]
    if _on_gpu() and x.dtype == w.dtype and supports(M, N, K, x.dtype):
        return "gpu"
    return "xla"


@functools.partial(jax.jit, static_argnames=("out_dtype", "impl", "config", "interpret"))
def _skinny_matmul(x, w, *, out_dtype, impl, config, interpret):
    if resolve_impl(impl, x, w) == "xla":
        return ref_skinny_matmul(x, w, out_dtype)
    # Off a GPU the kernel can only run in interpret mode (slow; for tests).
    interpret = interpret or not _on_gpu()
    return smg.gpu_skinny_matmul(x, w, out_dtype=out_dtype, config=config, interpret=interpret)


def skinny_matmul(
    x: jax.Array,  # [M, K]
    w: jax.Array,  # [N, K]
    *,
    out_dtype: jnp.dtype | None = None,
    impl: Impl = "auto",
    config: smg.KernelConfig | None = None,
    interpret: bool = False,
) -> jax.Array:  # [M, N] in out_dtype (default x.dtype)
    """y[M, N] = x[M, K] · w[N, K]ᵀ, float32 accumulation, cast to out_dtype.

    config: kernel shape for the "gpu" path (default: skinny_matmul_gpu.choose_config); ignored
    by "xla". impl="gpu" on shapes the kernel does not cover raises ValueError.
    """
    validate_inputs(x, w, out_dtype, impl)
    out_dtype = None if out_dtype is None else jnp.dtype(out_dtype)
    return _skinny_matmul(x, w, out_dtype=out_dtype, impl=impl, config=config, interpret=interpret)
