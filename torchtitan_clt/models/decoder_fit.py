"""Refit a converted model's decoder to its new codes (``to_jumprelu(refit_decoder=...)``).

A JumpReLU model converted from TopK selects slightly different features than its source; the
source's decoder was trained for the source's codes. With the codes a  # [N, L, F] of the
converted model fixed, each target layer's decoder and bias have a closed-form least-squares fit:
for target layer t, A_t = [a_s for the sources s that write t] (PLT / SAE: s = t; CLT: s ≤ t),

    W_t = argmin ‖(A_t − Ā_t) W − (Y_t − Ȳ_t)‖² + λ ‖W − W_t,old‖²,   b_t = Ȳ_t − Ā_t W_t,

a ridge shrunk toward the old decoder (λ = ``ridge`` × the mean diagonal of the centered Gram
matrix), so features that fire rarely in the calibration rows keep their trained rows. Solved in
float64 from the [(t+1)·F]² Gram matrix (CLT) — cheap next to the LLM forward that made the rows.
Everything is in the model's standardized units.
"""

from __future__ import annotations

import torch

from torchtitan_clt.protocols.transcoder import Transcoder

REFIT_FAMILIES = ("plt", "sae", "clt")


def _old_decoder(model: Transcoder, t: int) -> torch.Tensor:
    """[S·F, d]: the rows that write target layer t, stacked over the sources in order."""
    if model.args.family == "clt":
        return torch.cat([model.W_dec[s][:, t - s, :] for s in range(t + 1)]).double()
    return model.W_dec[t].double()


def _set_decoder(model: Transcoder, t: int, W: torch.Tensor) -> None:
    F = model.args.features_per_layer
    if model.args.family == "clt":
        for s in range(t + 1):
            dst = model.W_dec[s]
            dst[:, t - s, :] = W[s * F : (s + 1) * F].to(dst.dtype)
    else:
        model.W_dec[t] = W.to(model.W_dec.dtype)


@torch.no_grad()
def refit_decoder(model: Transcoder, acts: torch.Tensor, ys: torch.Tensor, ridge: float = 1e-2) -> None:
    """Replace ``model``'s W_dec and b_dec (in place) by the ridge fit above.

    ``acts  # [N, L, F]``: the model's codes on calibration rows (standardized inputs);
    ``ys  # [N, L, d_out]``: the targets in standardized units (``model.standardize_out(y)``)."""
    family = model.args.family
    if family not in REFIT_FAMILIES:
        raise ValueError(f"refit_decoder supports the {', '.join(REFIT_FAMILIES)} families, not {family!r}.")
    L = model.args.n_layers
    for t in range(L):
        A = (acts[:, : t + 1] if family == "clt" else acts[:, t : t + 1]).flatten(1).double()  # [N, S·F]
        Y = ys[:, t].double()  # [N, d]
        a_mean, y_mean = A.mean(0), Y.mean(0)
        A -= a_mean
        gram = A.T @ A
        lam = ridge * gram.diagonal().mean().clamp_min(1e-12)
        W_old = _old_decoder(model, t)
        rhs = A.T @ (Y - y_mean) + lam * W_old
        gram.diagonal().add_(lam)
        W = torch.linalg.solve(gram, rhs)  # [S·F, d]
        _set_decoder(model, t, W)
        model.b_dec[t] = (y_mean - a_mean @ W).to(model.b_dec.dtype)
