"""Dictionary families and activations; importing this fills the model and activation registries."""

from torchtitan_clt.models import activations, clt, matryoshka, molt, plt, sae  # noqa: F401  (registration)
from torchtitan_clt.models.losses import build_loss_fn

__all__ = ["activations", "clt", "matryoshka", "molt", "plt", "sae", "build_loss_fn"]
