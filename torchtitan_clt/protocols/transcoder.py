"""The dictionary interface: ``TranscoderArgs``, ``TranscoderOutput`` and the ``Transcoder`` base.

A transcoder reads ``x  # [batch, n_layers, d_in]`` and writes ``y_hat  # [batch, n_layers, d_out]``.
Training runs in standardized units (``forward_std``); the public API (``encode`` / ``decode`` /
``forward``) takes and gives raw activations, applying the standardization buffers around the
standardized path. ``fold_standardization`` moves those buffers into the weights (export).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from torchtitan_clt.tools.dtypes import dtype_name, parse_dtype  # noqa: F401  (re-exported: the families import them here)


def _needs_decoder_norms(loss_cfg: Any) -> bool:
    return loss_cfg.sparsity != "none" or loss_cfg.lambda_preact > 0


def skip_connection_of(model_cfg: Any) -> bool:
    """Whether ``model.skip_connection`` (``auto`` / ``true`` / ``false``) turns the skip path on."""
    from torchtitan_clt.config.job_config import SKIP_FAMILIES

    setting = model_cfg.skip_connection
    return model_cfg.name in SKIP_FAMILIES if setting == "auto" else setting == "true"


def family_fields(model_cfg: Any) -> dict[str, Any]:
    """The [model] fields that belong to one family, named ``<family's first word>_...``
    (``molt_ranks`` for ``molt``, ``matryoshka_prefixes`` for ``matryoshka_clt``): they travel in
    ``TranscoderArgs.extra`` so that an export rebuilds the same model."""
    prefix = model_cfg.name.split("_")[0] + "_"
    return {
        f.name: getattr(model_cfg, f.name) for f in dataclasses.fields(model_cfg) if f.name.startswith(prefix)
    }


def _registered_options(model_cfg: Any) -> dict[str, Any]:
    """A registered family's own options (``ModelSpec.options``), checked."""
    from torchtitan_clt.protocols.model_spec import family_options, get_model_spec

    return family_options(get_model_spec(model_cfg.name), model_cfg)


@dataclass
class TranscoderArgs:
    """What a family's ``build_fn`` receives; saved whole in every export."""

    family: str = "clt"
    """Registered family name (``model.name``)."""
    n_layers: int = 1
    """Layers covered (L): the dictionary's layer axis, in the order of ``layers``."""
    d_in: int = 1
    """Width of the input hook."""
    d_out: int = 1
    """Width of the target hook."""
    features_per_layer: int = 1
    """Features per layer (F)."""
    activation: str = "jumprelu"
    """Registered activation name."""
    k: int = 32
    """TopK / BatchTopK: active features per token and layer."""
    batchtopk_scope: str = "layer"
    """BatchTopK selection per ``layer`` or across ``all`` layers jointly."""
    jumprelu_threshold_init: float = 0.03
    """Initial JumpReLU threshold θ."""
    jumprelu_bandwidth: float = 0.1
    """Rectangle-kernel width ε of JumpReLU's straight-through estimator."""
    threshold_ema_decay: float = 0.99
    """EMA decay of the TopK / BatchTopK inference threshold."""
    decoder_init_norm: float = 0.0
    """Initial norm of each feature's decoder row (0: family default)."""
    tied_init: bool = True
    """Initialize the encoder from the decoder."""
    skip_connection: bool = False
    """A trained linear path ``W_skip  # [L, d_in, d_out]`` from x_l to ŷ_l (``model.skip_connection``)."""
    dtype: str = "float32"
    """Parameter dtype."""
    decoder_norm: str = "concat"
    """How ``forward_std`` takes a feature's decoder norm over its targets (``concat`` / ``sum``,
    or ``none``: not at all). Set from ``loss.decoder_norm`` so that the norm is taken inside
    forward, where sharded (FSDP) parameters are whole; ``none`` when no loss term needs it."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Family-specific settings."""
    model_name: str = ""
    """LLM the dictionary was trained on."""
    hook_in: str = "resid_mid"
    """Input hook point name."""
    hook_out: str = "mlp_out"
    """Target hook point name."""
    layers: list[int] = field(default_factory=list)
    """LLM layer index of each of the L dictionary layers."""

    @classmethod
    def from_job_config(
        cls,
        cfg: Any,
        n_layers: int,
        d_in: int,
        d_out: int,
        layers: list[int],
        model_name: str,
        hook_in: str,
        hook_out: str,
    ) -> TranscoderArgs:
        m = cfg.model
        return cls(
            family=m.name,
            n_layers=n_layers,
            d_in=d_in,
            d_out=d_out,
            features_per_layer=m.features_per_layer,
            activation=m.activation,
            k=m.k,
            batchtopk_scope=m.batchtopk_scope,
            jumprelu_threshold_init=m.jumprelu_threshold_init,
            jumprelu_bandwidth=m.jumprelu_bandwidth,
            threshold_ema_decay=m.threshold_ema_decay,
            decoder_init_norm=m.decoder_init_norm,
            tied_init=m.tied_init,
            skip_connection=skip_connection_of(m),
            dtype=m.dtype,
            decoder_norm=cfg.loss.decoder_norm if _needs_decoder_norms(cfg.loss) else "none",
            extra={**family_fields(m), **_registered_options(m)},
            model_name=model_name,
            hook_in=hook_in,
            hook_out=hook_out,
            layers=list(layers),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TranscoderArgs:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"TranscoderArgs: unknown field(s) {unknown}; the file was written by a newer "
                "torchtitan_clt, upgrade to read it."
            )
        return cls(**d)


@dataclass
class SparseCode:
    """The activations of the sparse step as (feature id, value) pairs, the form they have there:
    the metrics and the sparsity terms read them as they are, a dense ``[B, L, F]`` tensor is
    built only for a reader that asks for ``TranscoderOutput.acts``."""

    idx: torch.Tensor
    """``[B, L, K]`` int64 ids among this rank's features, -1 = padding."""
    vals: torch.Tensor
    """``[B, L, K]`` the values (0 at padding), differentiable."""
    n_features: int
    """Features per layer on this rank."""
    mesh: Any = None
    """The tp mesh when the features are this rank's shard (``Shard(-1)`` of the whole code)."""

    def to_dense(self) -> torch.Tensor:
        """``[B, L, F]`` (a ``Shard(-1)`` DTensor under tp), differentiable through ``vals``."""
        from torchtitan_clt.kernels.dispatch import sparse_to_dense

        return self._placed(sparse_to_dense(self.idx, self.vals, self.n_features), "shard")

    def active(self) -> torch.Tensor:
        """``[B, L, K]`` bool: the entries whose value is non-zero (what ``acts != 0`` counts)."""
        return (self.idx >= 0) & (self.vals.detach() != 0)

    def fired(self) -> torch.Tensor:
        """``[L, F]`` bool: the features active for some token (a ``Shard(-1)`` DTensor under tp)."""
        n_layers, f = self.idx.shape[1], self.n_features
        rows = torch.arange(n_layers, device=self.idx.device).view(1, n_layers, 1) * f
        flat = (rows + self.idx.clamp(min=0)).reshape(-1)
        hits = torch.zeros(n_layers * f, dtype=torch.int32, device=self.idx.device)
        hits.scatter_add_(0, flat, self.active().reshape(-1).to(torch.int32))
        return self._placed((hits > 0).view(n_layers, f), "shard")

    def active_per_layer(self) -> torch.Tensor:
        """``[L]`` active entries summed over tokens (a ``Partial`` DTensor under tp)."""
        return self._placed(self.active().sum(dim=(0, 2)), "partial")

    def local(self) -> SparseCode:
        """This rank's code without its mesh (the losses' view of a sharded output)."""
        return dataclasses.replace(self, mesh=None)

    def _placed(self, t: torch.Tensor, how: str) -> torch.Tensor:
        if self.mesh is None:
            return t
        from torch.distributed.tensor import DTensor, Partial, Shard

        placement = Shard(t.dim() - 1) if how == "shard" else Partial()
        return DTensor.from_local(t, self.mesh, [placement], run_check=False)


@dataclass(init=False)
class TranscoderOutput:
    """What ``forward_std`` returns. Built as ``TranscoderOutput(pre_acts=h, acts=a, y_hat=y, ...)``
    (a dense forward) or with ``code=`` instead of ``acts`` (the sparse step); ``acts`` then reads
    as the dense tensor, built from the code on first read."""

    pre_acts: torch.Tensor  # [B, L, F] standardized units
    dense_acts: torch.Tensor | None
    """``[B, L, F]`` as given or as built; None while only ``code`` holds the activations (a
    field, unlike ``acts``, so traversing the output (FSDP's hooks) never builds it)."""
    y_hat: torch.Tensor  # [B, L, d_out] standardized units
    dec_norms: torch.Tensor | None = None  # [L, F], mode args.decoder_norm, taken inside forward
    y_hat_prefixes: list[torch.Tensor] | None = None
    """Matryoshka: the reconstruction from each nested feature prefix, each [B, L, d_out]
    standardized (the last one is ``y_hat``); the reconstruction loss averages over them."""
    xs: torch.Tensor | None = None
    """The standardized input [B, L, d_in], for families whose decoder reads it (MOLT): a loss
    term that decodes other activations (AuxK) passes it to ``decode_std``."""
    code: SparseCode | None = None
    """The sparse step's activations as (id, value) pairs; None on a dense forward."""

    def __init__(
        self,
        pre_acts: torch.Tensor,
        acts: torch.Tensor | None = None,
        y_hat: torch.Tensor | None = None,
        dec_norms: torch.Tensor | None = None,
        y_hat_prefixes: list[torch.Tensor] | None = None,
        xs: torch.Tensor | None = None,
        code: SparseCode | None = None,
        dense_acts: torch.Tensor | None = None,
    ):
        if y_hat is None:
            raise TypeError("TranscoderOutput needs y_hat")
        if acts is None and dense_acts is None and code is None:
            raise TypeError("TranscoderOutput needs acts (dense) or code (the sparse step's pairs)")
        self.pre_acts, self.y_hat, self.dec_norms = pre_acts, y_hat, dec_norms
        self.dense_acts = acts if acts is not None else dense_acts
        self.y_hat_prefixes, self.xs, self.code = y_hat_prefixes, xs, code

    @property
    def acts(self) -> torch.Tensor:
        """``[B, L, F]``; on the sparse step built from ``code`` when first read (readers that
        can read ``code``: the sparse step itself keeps no dense activation tensor)."""
        if self.dense_acts is None and self.code is not None:
            self.dense_acts = self.code.to_dense()
        return self.dense_acts

    @acts.setter
    def acts(self, value: torch.Tensor | None) -> None:
        self.dense_acts = value

    def replace(self, **changes: Any) -> TranscoderOutput:
        """``dataclasses.replace`` that takes ``acts=`` too."""
        if "acts" in changes:
            changes["dense_acts"] = changes.pop("acts")
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class MeshGroups:
    """The process groups a sharded model computes over, handed in by ``distributed.parallelize`` (the
    model never builds them). One process: all ``None`` / 1."""

    batch: Any = None
    """Every rank holding a different part of ``[B, L, F]`` (dp × tp): BatchTopK selects over it."""
    features: Any = None
    """Ranks holding the same rows and different features (tp): TopK selects over it and the
    decoder's partial ŷ is summed over it."""
    batch_scale: int = 1
    """Global batch / this rank's batch (the data-parallel degree)."""
    feature_shards: int = 1
    """How many ranks split the features (tp)."""
    sum_decoder_partials: bool = True
    """Whether the decoder's output is a partial ŷ summed over ``features``; False under
    ``parallelism.tp_layout = "code"``, where each rank writes its own slice of ``d_out``."""


def feature_shard(full: torch.Tensor, n_local: int, group: Any) -> torch.Tensor:
    """This rank's columns of a whole ``[..., F]`` tensor, the features split evenly over
    ``group`` (``MeshGroups.features``) in rank order; ``full`` itself without a group."""
    if group is None:
        return full
    import torch.distributed as dist

    r = dist.get_rank(group)
    return full[..., r * n_local : (r + 1) * n_local]


class Transcoder(nn.Module):
    """Base class: standardization buffers, the raw-unit public API, and the training path.

    Subclasses set ``self.activation`` (an activation module) and implement ``pre_acts``,
    ``decode_std``, ``decoder_norms``, ``init_weights`` and ``_fold_into_weights``.
    """

    def __init__(self, args: TranscoderArgs):
        super().__init__()
        self.args = args
        L = args.n_layers
        # Buffers stay fp32 whatever the parameter dtype: they are statistics, not weights.
        self.register_buffer("in_mean", torch.zeros(L, args.d_in, dtype=torch.float32))
        self.register_buffer("in_scale", torch.ones(L, args.d_in, dtype=torch.float32))
        self.register_buffer("out_mean", torch.zeros(L, args.d_out, dtype=torch.float32))
        self.register_buffer("out_scale", torch.ones(L, args.d_out, dtype=torch.float32))
        self.mesh_groups = MeshGroups()

    def set_mesh_groups(self, groups: MeshGroups) -> None:
        """Called by ``distributed.parallelize``: the groups the forward's selection and decoder reduce over."""
        self.mesh_groups = groups
        act = getattr(self, "activation", None)
        if act is not None:
            act.mesh_groups = groups

    # --- standardization -------------------------------------------------------------------
    def reset_standardization(self) -> None:
        with torch.no_grad():
            self.in_mean.zero_()
            self.in_scale.fill_(1.0)
            self.out_mean.zero_()
            self.out_scale.fill_(1.0)

    def set_standardization(
        self,
        in_mean: torch.Tensor,
        in_scale: torch.Tensor,
        out_mean: torch.Tensor,
        out_scale: torch.Tensor,
    ) -> None:
        """Set per-layer statistics; each broadcasts to [L, d] (a [L, 1] scale is a scalar one)."""
        with torch.no_grad():
            for name, value in (
                ("in_mean", in_mean),
                ("in_scale", in_scale),
                ("out_mean", out_mean),
                ("out_scale", out_scale),
            ):
                buf = getattr(self, name)
                value = torch.as_tensor(value, dtype=buf.dtype).to(buf.device)
                if name.endswith("scale") and not bool((value > 0).all()):
                    raise ValueError(
                        f"{name} must be positive everywhere (got min {value.min().item():.3g}); "
                        "clamp the estimated std from below, e.g. std.clamp_min(1e-6)."
                    )
                buf.copy_(value.expand_as(buf))

    def standardize_in(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.in_mean) / self.in_scale

    def standardize_out(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.out_mean) / self.out_scale

    def unstandardize_out(self, ys: torch.Tensor) -> torch.Tensor:
        if hasattr(ys, "device_mesh"):  # a DTensor ŷ sharded over d_out (parallelism.tp_layout = "code")
            from torch.distributed.tensor.experimental import implicit_replication

            with implicit_replication():  # the whole buffers act as replicated: sliced locally
                return ys * self.out_scale + self.out_mean
        return ys * self.out_scale + self.out_mean

    @torch.no_grad()
    def fold_standardization(self) -> None:
        """Fold the buffers into the weights: raw in -> raw out is unchanged, buffers become identity.

        Encoder: h = W (x - μ)/σ + b = (W/σ) x + (b - (W/σ)·μ). Decoder: y = σ' (W a + b) + μ'
        = (W σ') a + (σ' b + μ'). Pre-activations, hence thresholds, do not change.
        """
        self._fold_into_weights(
            self.in_mean.float(), self.in_scale.float(), self.out_mean.float(), self.out_scale.float()
        )
        self.reset_standardization()

    # --- public API (raw units) ------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x  # [N, L, d_in] raw -> acts  # [N, L, F]"""
        L, d = self.args.n_layers, self.args.d_in
        if x.dim() != 3 or tuple(x.shape[1:]) != (L, d):
            raise ValueError(
                f"encode takes x of shape [N, n_layers={L}, d_in={d}] (tokens, the dictionary's layers "
                f"{self.args.layers or list(range(L))}, width), got {list(x.shape)}; stack one "
                "[N, d_in] activation per layer on dim 1."
            )
        return self.activation(self.pre_acts(self.standardize_in(x)))

    def decode(
        self, acts: torch.Tensor, x: torch.Tensor | None = None, *, features_only: bool = False
    ) -> torch.Tensor:
        """acts  # [N, L, F] -> y_hat  # [N, L, d_out] raw. A dictionary with a skip path
        (``model.skip_connection``) also needs its input ``x  # [N, L, d_in]`` raw, whose linear
        path is added; ``features_only=True`` leaves it out (what the features and the bias write)."""
        y = self.decode_std(acts)
        if not features_only and getattr(self, "W_skip", None) is not None:
            if x is None:
                raise ValueError(
                    "this dictionary has a skip path (W_skip): its output depends on the input too. "
                    "Call model.decode(acts, x) or model(x); model.decode(acts, features_only=True) "
                    "gives what the features and the bias write alone."
                )
            y = self._add_skip(y, self.standardize_in(x))
        return self.unstandardize_out(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self, "W_skip", None) is None:  # decode(acts): a family may override it so
            return self.decode(self.encode(x))
        return self.decode(self.encode(x), x)

    # --- training path (standardized units) ------------------------------------------------
    def forward_std(self, xs: torch.Tensor) -> TranscoderOutput:
        h = self.pre_acts(xs)
        a = self.activation(h)
        return TranscoderOutput(
            pre_acts=h,
            acts=a,
            y_hat=self.decode_std(a),
            dec_norms=None
            if self.args.decoder_norm == "none"
            else self.decoder_norms(self.args.decoder_norm),
        )

    # --- family hooks ----------------------------------------------------------------------
    def pre_acts(self, xs: torch.Tensor) -> torch.Tensor:
        """xs  # [B, L, d_in] standardized -> h  # [B, L, F]"""
        raise NotImplementedError

    def decode_std(self, acts: torch.Tensor) -> torch.Tensor:
        """acts  # [B, L, F] -> y_hat  # [B, L, d_out] standardized. (A family whose decoder
        also reads the input, MOLT, takes ``decode_std(acts, xs)`` and sets
        ``decode_needs_input = True``.)"""
        raise NotImplementedError

    decode_needs_input = False
    """True when ``decode_std`` needs the standardized input as a second argument (MOLT)."""

    def decode_std_with(self, acts: torch.Tensor, xs: torch.Tensor | None) -> torch.Tensor:
        """``decode_std`` for any family: passes ``xs`` only to those that read it."""
        if self.decode_needs_input:
            if xs is None:
                raise ValueError(f"{type(self).__name__} decodes from the input too: pass xs.")
            return self.decode_std(acts, xs)
        return self.decode_std(acts)

    def skip_std(self, xs: torch.Tensor) -> torch.Tensor | None:
        """The linear skip path  # [B, L, d_out] standardized (None without one)."""
        return None

    def skip_partial(self, xs: torch.Tensor) -> torch.Tensor | None:
        """This process's share of ``skip_std``, for a decoder that sums partials: all of it on
        one device; under tensor parallelism (``distributed/tensor_parallel.py``) the product of
        the rank's slice of ``d_in``, summed over ranks with the features' partials."""
        return self.skip_std(xs)

    def reconstruct_std(self, acts: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        """The whole standardized ŷ from features ``acts`` at input ``xs``: decoder, bias and
        skip path (``decode_std_with`` leaves the skip path out)."""
        return self._add_skip(self.decode_std_with(acts, xs), xs)

    def _add_skip(self, y: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        skip = self.skip_std(xs)
        return y if skip is None else y + skip.to(y.dtype)

    def decoder_norms(self, mode: str = "concat") -> torch.Tensor:
        """Per-feature decoder norm  # [L, F]; ``mode`` is ``concat`` or ``sum`` over targets."""
        raise NotImplementedError

    def decoder_rows(self) -> list[tuple[torch.Tensor, tuple[int, ...]]]:
        """``[(param, dims)]``: the decoder parameters and the dimensions one feature's row spans
        (what ``model.decoder_unit_norm`` keeps at norm 1); [] for a family without such rows."""
        return []

    def init_weights(self, seed: int) -> None:
        """Deterministic init from ``seed``: the same weights on any device and mesh."""
        raise NotImplementedError

    def _fold_into_weights(
        self, in_mean: torch.Tensor, in_scale: torch.Tensor, out_mean: torch.Tensor, out_scale: torch.Tensor
    ) -> None:
        raise NotImplementedError
