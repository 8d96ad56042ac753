"""XLA compiler options for PVT v2 inference, per backend; pass them to `jax.jit`.

    forward = jax.jit(lambda p, x: model.apply(p, x),
                      compiler_options=inference_compiler_options())

XLA:CPU (jax 0.10) by default hands each matrix product, together with the reductions and
elementwise ops around it, to YNNPACK as one fused subgraph. YNNPACK takes neither slices nor
broadcasts, so in PVT v2's forward pass XLA first writes every shifted tap of the depthwise conv and
every broadcast constant out at full map size (in B0 ~120 ms of copies per batch of 16 at 224px),
and YNNPACK's products with few input channels (the FFN's fc1) run at ~60% of Eigen's. Without
those subgraphs, XLA's own loop fusions read the taps in place and Eigen does the products: B0
inference 1.5-1.7x and B2 1.2-1.3x faster here (`python -m pvt_jax.benchmark`), the same sums.

Training keeps the default: there YNNPACK's products (with their fused bias and reduction
epilogues) win, a B0 train step ~10% faster than with Eigen's (measured with the CPU kernels).
Other backends need nothing.
"""

import jax

# An empty list of fusion types: no YNNPACK subgraphs (the spelling XLA reads without a warning).
_CPU_INFERENCE = {"xla_cpu_experimental_ynn_fusion_type": ""}


def inference_compiler_options(platform: str | None = None) -> dict:
  """Options for jitting a forward pass on `platform` (default: JAX's default backend)."""
  platform = platform or jax.default_backend()
  return dict(_CPU_INFERENCE) if platform == "cpu" else {}
