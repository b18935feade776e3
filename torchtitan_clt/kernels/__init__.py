"""The hot path: fused selection and sparse decoding, Triton kernels with torch fallbacks.

One dispatch point per op (``dispatch.py``), backend from ``--kernels.backend`` (``backend.py``):

- ``topk_select``, ``batchtopk_threshold``, ``batchtopk_select``, ``compact``: selection straight
  to the sparse layout ``idx, vals [N, L, K]`` (-1 / 0 padding).
- ``sparse_decode`` (``[N, K]`` x ``W [F, D]``), ``clt_sparse_decode`` (feature-major
  ``W_dec,s [F, L-s, d]``), ``plt_sparse_decode`` (``W_dec [L, F, d]``), ``sparse_grad_weight``,
  ``sparse_encoder_grads``; ``decoder_row_norms`` / ``tanh_sparsity_sparse`` for the sparsity term.
- ``sparse_step.clt_sparse_forward`` / ``clt_sparse_loss``: a whole sparse CLT step.

Triton modules are imported lazily, so this package imports without Triton.
"""

from torchtitan_clt.kernels.backend import (
    KernelOptions,
    configure,
    configure_from_job,
    options,
    resolve_backend,
)
from torchtitan_clt.kernels.dispatch import (
    batchtopk_select,
    batchtopk_threshold,
    clt_sparse_decode,
    compact,
    decoder_row_norms,
    plt_sparse_decode,
    sparse_decode,
    sparse_encoder_grads,
    sparse_grad_weight,
    tanh_sparsity_sparse,
    topk_select,
)

__all__ = [
    "KernelOptions",
    "batchtopk_select",
    "batchtopk_threshold",
    "clt_sparse_decode",
    "compact",
    "configure",
    "configure_from_job",
    "decoder_row_norms",
    "options",
    "plt_sparse_decode",
    "resolve_backend",
    "sparse_decode",
    "sparse_encoder_grads",
    "sparse_grad_weight",
    "tanh_sparsity_sparse",
    "topk_select",
]
