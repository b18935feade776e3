"""Dictionary families and activations. Each family registers its ``ModelSpec`` when its package is
imported, which ``model_registry.get(name)`` does on lookup (``protocols/registry.py``).

Families (``model.name``) and their initialization defaults (``init_weights(seed)``; the options
``model.decoder_init_norm``, ``model.tied_init``, ``model.jumprelu_threshold_init`` and
``model.b_dec_init`` override them):

| family           | decoder                                   | encoder                  | b_dec       |
|------------------|-------------------------------------------|--------------------------|-------------|
| ``plt``          | random directions, norm 0.1               | tied: W_enc = W_decᵀ     | 0           |
| ``clt``          | U(±1/sqrt(L·d_out)) (rows scaled to       | tied to the own-layer    | 0           |
|                  | ``decoder_init_norm`` when > 0)           | block W_dec,s→sᵀ         |             |
| ``sae``          | as ``plt``                                | as ``plt``               | target mean |
| ``molt``         | V_j ~ N(0, 1/d_in), U_j scaled to         | gates: random directions | 0           |
|                  | ‖U_j V_j‖_F = 1                           | of norm 0.1 (not tied)   |             |
| ``matryoshka_clt`` | as ``clt``                              | as ``clt``               | 0           |

Untied encoders (``tied_init = false``, or d_in ≠ d_out) are U(±1/sqrt(F)); b_enc = 0; JumpReLU
starts at θ = ``jumprelu_threshold_init`` (0.03, standardized units). ``b_dec = target mean`` is
set by the trainer from the standardization statistics (0 in standardized units when the targets
are centered). Activations: relu, jumprelu, topk, batchtopk (scope ``layer`` or ``all``) for every
family, except ``matryoshka_clt``: topk / batchtopk only.
"""

from torchtitan_clt.models.losses import build_loss_fn

__all__ = ["build_loss_fn"]
