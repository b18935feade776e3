"""Dictionary families and activations; importing this fills the model and activation registries."""

from torchtitan_clt.models import activations, clt, plt  # noqa: F401  (registration side effects)
from torchtitan_clt.models.losses import build_loss_fn

__all__ = ["activations", "clt", "plt", "build_loss_fn"]
