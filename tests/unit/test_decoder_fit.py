"""The decoder refit of a converted model: with exact linear targets it recovers the decoder and
bias that produced them (PLT/SAE per layer; CLT across its source layers, checked against a float64
``lstsq``), and the ridge keeps the old rows of features that never fire."""

import pytest
import torch
from helpers import tiny_model

from torchtitan_clt.models.decoder_fit import refit_decoder


def _codes(n, L, F, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, L, F, generator=g) * (torch.rand(n, L, F, generator=g) < 0.5)


@pytest.mark.parametrize("family", ["plt", "sae", "clt"])
def test_exact_targets_recover_the_decoder(family):
    L, F, d, n = 3, 5, 4, 400
    truth, m = (
        tiny_model(family, "jumprelu", L=L, d=d, F=F, seed=1),
        tiny_model(family, "jumprelu", L=L, d=d, F=F),
    )
    with torch.no_grad():
        truth.b_dec.copy_(torch.randn(L, d))
    a = _codes(n, L, F, 0)
    with torch.no_grad():
        y = truth.decode_std_with(a, None)
    refit_decoder(m, a, y, ridge=1e-10)
    with torch.no_grad():
        for name, p in truth.named_parameters():
            if name.startswith("W_dec") or name == "b_dec":
                torch.testing.assert_close(dict(m.named_parameters())[name], p, atol=1e-4, rtol=0)


def test_clt_matches_lstsq_on_noisy_targets():
    L, F, d, n = 3, 4, 3, 300
    m = tiny_model("clt", "jumprelu", L=L, d=d, F=F)
    a = _codes(n, L, F, 2)
    y = torch.randn(n, L, d, generator=torch.Generator().manual_seed(3))
    refit_decoder(m, a, y, ridge=1e-12)
    for t in range(L):  # independent: least squares with an intercept column, float64
        A = torch.cat([a[:, : t + 1].flatten(1).double(), torch.ones(n, 1, dtype=torch.float64)], 1)
        sol = torch.linalg.lstsq(A, y[:, t].double()).solution
        W = torch.cat([m.W_dec[s][:, t - s, :].double() for s in range(t + 1)])
        torch.testing.assert_close(W, sol[:-1], atol=1e-4, rtol=0)
        torch.testing.assert_close(m.b_dec[t].double(), sol[-1], atol=1e-4, rtol=0)


def test_silent_features_keep_their_rows():
    L, F, d, n = 2, 6, 4, 200
    m = tiny_model("plt", "jumprelu", L=L, d=d, F=F)
    old = m.W_dec.detach().clone()
    a = _codes(n, L, F, 4)
    a[..., 5] = 0  # feature 5 never fires in the calibration rows
    refit_decoder(m, a, torch.randn(n, L, d), ridge=1e-2)
    torch.testing.assert_close(m.W_dec[:, 5].detach(), old[:, 5])
    assert not torch.allclose(m.W_dec[:, 0], old[:, 0])
