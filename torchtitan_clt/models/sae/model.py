"""Sparse autoencoder (SAE): reads and writes one hook point, ŷ_l = W_dec,l a_l + b_dec,l ≈ x_l.

The same computation as the per-layer transcoder (``W_enc  # [L, F, d]``, ``W_dec  # [L, F, d]``,
``b_enc  # [L, F]``, ``b_dec  # [L, d]``); what differs is the data (``data.hook_in`` =
``data.hook_out``, e.g. ``resid_post``) and the defaults: the encoder starts tied to the decoder
(d_in = d_out always holds), decoder rows start at norm 0.1, and ``b_dec`` starts at the target
mean (``model.b_dec_init = "auto"``), as in Anthropic's "Circuits Updates – April 2024" recipe.
"""

from __future__ import annotations

from torchtitan_clt.config.manager import ConfigError
from torchtitan_clt.models.plt.model import PerLayerTranscoder
from torchtitan_clt.protocols.transcoder import TranscoderArgs


class SparseAutoencoder(PerLayerTranscoder):
    pass


def build_sae(args: TranscoderArgs) -> SparseAutoencoder:
    if args.hook_in != args.hook_out or args.d_in != args.d_out:
        raise ConfigError(
            f"model.name = 'sae' reads and writes one hook, but data.hook_in = {args.hook_in!r} "
            f"(width {args.d_in}) and data.hook_out = {args.hook_out!r} (width {args.d_out}): set "
            "both to the same point (e.g. 'resid_post'), or use model.name = 'plt' for a transcoder."
        )
    return SparseAutoencoder(args)
