"""The synthetic source draws x = Σ a_i D_i + noise, y = Σ a_i E_i: checked against a float64
loop over the same draws, and its position (batches served) resumes exactly."""

import torch

from torchtitan_clt.data.source import SourceContext
from torchtitan_clt.data.synthetic import SyntheticSource


def test_batch_is_the_sum_of_its_features():
    s = SyntheticSource(3, 8, SourceContext(seed=4), n_features=32, k=3, noise=0.0)
    g = s._generator()  # the generator batch 0 is drawn from
    idx = torch.randint(s.n_features, (5, 3, 3), generator=g)
    mag = torch.rand((5, 3, 3), generator=g) * 2.0 + 0.5
    x, y = s.next_batch(5)
    want_x = torch.zeros(5, 3, 8, dtype=torch.float64)
    want_y = torch.zeros(5, 3, 8, dtype=torch.float64)
    for b in range(5):
        for layer in range(3):
            for j in range(3):
                f, a = idx[b, layer, j], mag[b, layer, j].double()
                want_x[b, layer] += a * s.D[f].double()
                want_y[b, layer] += a * s.E[f].double()
    torch.testing.assert_close(x.double(), want_x, atol=1e-5, rtol=0)
    torch.testing.assert_close(y.double(), want_y, atol=1e-5, rtol=0)


def test_noise_and_resume():
    a = SyntheticSource(2, 8, SourceContext(seed=1), noise=0.1)
    b = SyntheticSource(2, 8, SourceContext(seed=1), noise=0.0)
    xa, ya = a.next_batch(64)
    xb, yb = b.next_batch(64)
    torch.testing.assert_close(ya, yb)  # same draws; the noise goes to x only
    assert 0.05 < (xa - xb).std().item() < 0.2
    sd = a.state_dict()
    want = a.next_batch(16)
    c = SyntheticSource(2, 8, SourceContext(seed=1), noise=0.1)
    c.load_state_dict(sd)
    got = c.next_batch(16)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
