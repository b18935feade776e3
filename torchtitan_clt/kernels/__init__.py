"""The hot path: fused selection and sparse decoding, Triton kernels with torch fallbacks.

One dispatch point per op (``dispatch.py``), backend from ``--kernels.backend`` (``backend.py``):

- ``select`` (``selection.py``): the one TopK / BatchTopK selection routine, on one process or over
  the ranks of a process group (exact: the one-process answer), used by every path that selects;
  built on ``topk_select``, ``batchtopk_threshold``, ``batchtopk_select_ids``, ``compact``:
  selection straight to the sparse layout ``idx, vals [N, L, K]`` (-1 / 0 padding).
- ``sparse_decode`` (``[N, K]`` x ``W [F, D]``), ``clt_sparse_decode`` (feature-major
  ``W_dec,s [F, L-s, d]``), ``plt_sparse_decode`` (``W_dec [L, F, d]``), ``sparse_grad_weight``,
  ``sparse_encoder_grads``; ``decoder_row_norms`` / ``tanh_sparsity_sparse`` for the sparsity term.
- ``sparse_step.sparse_forward``: a layerwise family's whole sparse forward (the CLT's:
  ``clt_sparse_forward`` / ``clt_sparse_loss``), tensor parallel included.

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
    batchtopk_select_ids,
    batchtopk_threshold,
    clt_sparse_decode,
    compact,
    decoder_row_norms,
    gather_selected,
    plt_sparse_decode,
    sparse_decode,
    sparse_encoder_grads,
    sparse_grad_weight,
    tanh_sparsity_sparse,
    topk_select,
)
from torchtitan_clt.kernels.selection import Selection, select

__all__ = [
    "KernelOptions",
    "Selection",
    "batchtopk_select",
    "batchtopk_select_ids",
    "batchtopk_threshold",
    "clt_sparse_decode",
    "compact",
    "configure",
    "configure_from_job",
    "decoder_row_norms",
    "gather_selected",
    "options",
    "plt_sparse_decode",
    "resolve_backend",
    "select",
    "sparse_decode",
    "sparse_encoder_grads",
    "sparse_grad_weight",
    "tanh_sparsity_sparse",
    "topk_select",
]
