"""Splicing a dictionary into an LLM forward: hooks, ablations, and the layer-by-layer state.

Only the public ``Transcoder`` API is used, on ``[N, L, d]`` tensors with one layer filled (the
encoder of layer s reads x_s only). A per-layer dictionary (PLT, SAE, MOLT: target t reads only
layer t) gives ``forward(X_t)[:, t]``. A cross-layer one (CLT, Matryoshka CLT) adds source s's
write ``decode(A_s) − decode(0)``, ``A_s`` holding only layer s's features, to a running sum:
exact because its decoder is affine in the features. Which kind a model is: its ``cross_layer``
attribute if it has one, else whether it has per-source decoders ``W_dec[s]  # [F, L−s, d]``.
A family whose decoder also reads the input (``decode_needs_input``, MOLT) is decoded with it:
source s's write is ``decode(A_s, X_s) − decode(0, X_s)`` and the bias path ``decode(0, 0)``,
exact when all-zero features give an output that does not depend on the input (MOLT: b_dec).
A skip path (``W_skip``, ``model.skip_connection``) reads only its own layer's input and writes
its own target: ``skip_write`` adds it to that target, beside what the features write.
Cost: one full-width encode and decode per covered layer and forward, in token chunks.

Fast paths (same numbers, L× less work): the built-in families' own per-layer pieces are used
when a model does not override them: layer i's encoder (``W_enc[i]``, ``b_enc[i]``), the CLT's
per-source decode ``_decode_source``, the PLT / SAE decoder ``W_dec[i]``. ``FAST_PATHS = False``
turns them off (the tests compare both). On a mesh the same pieces run on each rank's
tensor-parallel shard with the group's collectives (``metrics/sharded_eval.py``, passed as ``ops``).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from torchtitan_clt.data.hooks import (
    POINT_ORDER,
    check_layers,
    check_point,
    d_model,
    hook_module,
    output_tensor,
)
from torchtitan_clt.models.clt.model import CrossLayerTranscoder
from torchtitan_clt.models.common import LayerwiseTranscoder
from torchtitan_clt.models.plt.model import PerLayerTranscoder
from torchtitan_clt.protocols.transcoder import Transcoder

# Elements of one [chunk, L, max(F, d)] temporary: bounds the memory of encode/decode calls.
DEFAULT_CHUNK_ELEMENTS = 1 << 26
FAST_PATHS = True


@dataclass
class SpliceSpec:
    """Where a dictionary sits in the LLM: its LLM layers and hook points."""

    layers: list[int]
    hook_in: str
    hook_out: str

    @classmethod
    def of(cls, transcoder: nn.Module, llm: nn.Module) -> SpliceSpec:
        a = transcoder.args
        layers = list(a.layers) or list(range(a.n_layers))
        if len(layers) != a.n_layers:
            raise ValueError(
                f"transcoder args.layers {layers} does not have n_layers = {a.n_layers} entries."
            )
        check_point(a.hook_in)
        check_point(a.hook_out)
        width = d_model(llm)
        if (a.d_in, a.d_out) != (width, width):
            raise ValueError(
                f"the dictionary reads {a.d_in} and writes {a.d_out} dimensions, but the LLM's hook "
                f"points have {width}: evaluate it with the LLM it was trained on (data.model_path)."
            )
        if POINT_ORDER[a.hook_in] > POINT_ORDER[a.hook_out]:
            raise ValueError(
                f"hook_in {a.hook_in!r} comes after hook_out {a.hook_out!r} in a layer's forward: the "
                "dictionary's output could not depend on its input. Check the export's hook points."
            )
        return cls(check_layers(llm, layers), a.hook_in, a.hook_out)


def is_cross_layer(transcoder: nn.Module) -> bool:
    """Whether target t may read sources s < t (see the module docstring)."""
    flag = getattr(transcoder, "cross_layer", None)
    if flag is not None:
        return bool(flag)
    W = getattr(transcoder, "W_dec", None)
    L = transcoder.args.n_layers
    return (
        isinstance(W, nn.ParameterList)
        and len(W) == L
        and all(w.dim() == 3 and w.shape[1] == L - s for s, w in enumerate(W))
    )


def _inherits(tc: nn.Module, base: type, *names: str) -> bool:
    """``tc`` is a ``base`` whose methods ``names`` are not overridden."""
    return isinstance(tc, base) and all(getattr(type(tc), n) is getattr(base, n) for n in names)


class _LayerOps:
    """Layer i of a dictionary alone, through the family's own pieces (see the module docstring)."""

    def __init__(self, tc: nn.Module):
        self.tc = tc
        enc = (
            FAST_PATHS
            and _inherits(tc, LayerwiseTranscoder, "pre_acts")
            and _inherits(tc, Transcoder, "encode")
        )
        dec = enc and _inherits(tc, Transcoder, "decode", "forward")
        self.clt = dec and _inherits(tc, CrossLayerTranscoder, "decode_std", "_decode_source")
        self.plt = dec and _inherits(tc, PerLayerTranscoder, "decode_std")

    def encode(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """x  # [c, d_in] raw -> layer i's features  # [c, F]."""
        tc = self.tc
        xs = (x - tc.in_mean[i]) / tc.in_scale[i]
        h = xs.to(tc.W_enc.dtype) @ tc.W_enc[i].t() + tc.b_enc[i]  # [c, F]
        H = h.new_zeros(h.shape[0], tc.args.n_layers, h.shape[1])
        H[:, i] = h  # the activation indexes its thresholds by layer: give it the [c, L, F] layout
        return tc.activation(H)[:, i]

    def clt_write(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Source i's write to targets i..L-1  # [c, L−i, d_out], raw units, no bias."""
        tc = self.tc
        return tc._decode_source(i, self.encode(i, x)).float() * tc.out_scale[i:]

    def plt_output(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Layer i's output  # [c, d_out] raw."""
        tc = self.tc
        a = self.encode(i, x).to(tc.W_dec.dtype)
        y = (a @ tc.W_dec[i] + tc.b_dec[i]).float() * tc.out_scale[i] + tc.out_mean[i]
        skip = skip_write(tc, i, x)
        return y if skip is None else y + skip


def skip_write(tc: nn.Module, i: int, x: torch.Tensor) -> torch.Tensor | None:
    """Layer i's skip path from its input ``x  # [c, d_in]`` raw to its own target  # [c, d_out]
    raw, no bias (None without one)."""
    W = getattr(tc, "W_skip", None)
    if W is None:
        return None
    xs = (x - tc.in_mean[i]) / tc.in_scale[i]
    return (xs.to(W.dtype) @ W[i]).float() * tc.out_scale[i]


class _Writes:
    """One patched forward's dictionary state: what each replaced target will receive.

    ``y  # [n, len(targets), d_out]``: per-layer models store their output at the target read;
    cross-layer models add every source's write to a running sum, plus ``base  # [L, d_out]``
    = decode(0) (the bias path) at output time."""

    def __init__(
        self, transcoder: nn.Module, targets: list[int], chunk_elements: int, ops: _LayerOps | None = None
    ):
        self.tc = transcoder
        a = transcoder.args
        self.L, self.F, self.d_in, self.d_out = a.n_layers, a.features_per_layer, a.d_in, a.d_out
        self.targets = targets
        ref = next(iter(transcoder.parameters()), None)
        self.device = ref.device if ref is not None else torch.device("cpu")
        self.cross = is_cross_layer(transcoder)
        self.ops = ops or _LayerOps(transcoder)
        self.sharded = getattr(self.ops, "sharded", False)  # metrics/sharded_eval.py: tp shards
        self.base = None
        if self.sharded:  # each rank accumulates its part; output() makes a target whole
            self.cross = self.ops.clt
            self.base = self.ops.base()
        elif self.cross:
            zeros = torch.zeros(1, self.L, self.F, device=self.device)
            self.base = self._decode(zeros, torch.zeros(1, self.L, self.d_in, device=self.device))[0].float()
        self.chunk = max(1, chunk_elements // (self.L * max(self.F, self.d_in, self.d_out)))
        self.y: torch.Tensor | None = None

    def read(self, i: int, x: torch.Tensor) -> None:
        """Dictionary layer i's input ``x  # [n, d_in]``."""
        if not self.cross and i not in self.targets:
            return
        n = x.shape[0]
        if self.y is None:
            width = self.ops.width if self.sharded else self.d_out
            self.y = torch.zeros(n, len(self.targets), width, device=self.device)
        x = x.to(self.device, torch.float32)
        later = [(k, t - i) for k, t in enumerate(self.targets) if t >= i]  # (slot, offset) reached
        for r in range(0, n, self.chunk):
            xc = x[r : r + self.chunk]
            y = self.y[r : r + self.chunk]
            if not self.cross:
                y[:, self.targets.index(i)] = self._layer_output(i, xc)
            elif self.sharded:  # this rank's part, skip path included
                if later:  # the same on every rank: the collectives stay matched
                    w = self.ops.clt_write(i, xc, skip=i in self.targets)
                    y[:, [k for k, _ in later]] += w[:, [o for _, o in later]]
                continue
            elif self.ops.clt:
                if later:
                    w = self.ops.clt_write(i, xc)
                    y[:, [k for k, _ in later]] += w[:, [o for _, o in later]]
            else:
                y += self._generic_write(i, xc)[:, self.targets]
            if self.cross and i in self.targets and (skip := skip_write(self.tc, i, xc)) is not None:
                y[:, self.targets.index(i)] += skip  # decode() above leaves the skip path out

    def _one_layer(self, i: int, x: torch.Tensor) -> torch.Tensor:
        X = torch.zeros(x.shape[0], self.L, self.d_in, device=self.device)
        X[:, i] = x
        return X

    def _layer_output(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if self.ops.plt:
            return self.ops.plt_output(i, x)
        # Target i reads layer i only: whatever the other layers produce is ignored.
        return self.tc(self._one_layer(i, x))[:, i].float()

    def _decode(self, acts: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``decode`` of any family: ``x  # [c, L, d_in]`` raw goes to those that read it."""
        if getattr(self.tc, "decode_needs_input", False):
            return self.tc.decode(acts, x)
        if getattr(self.tc, "W_skip", None) is not None:
            return self.tc.decode(acts, features_only=True)  # skip_write adds the skip path
        return self.tc.decode(acts)

    def _generic_write(self, i: int, x: torch.Tensor) -> torch.Tensor:
        X = self._one_layer(i, x)
        a = self.tc.encode(X)  # [c, L, F]; layer i depends on x_i only
        A = torch.zeros_like(a)
        A[:, i] = a[:, i]
        if getattr(self.tc, "decode_needs_input", False):
            # The zero-feature output at this input, not at x = 0: exactly source i's write.
            return (self._decode(A, X) - self._decode(torch.zeros_like(A), X)).float()
        return self._decode(A, X).float() - self.base  # [c, L, d_out]: source i's write

    def output(self, i: int) -> torch.Tensor:
        """Replacement at dictionary layer i  # [n, d_out]."""
        if self.y is None:
            raise RuntimeError(f"dictionary layer {i}: the target hook fired before any input hook.")
        y = self.y[:, self.targets.index(i)]
        if self.sharded:
            return self.ops.finish(y) + self.base[i]
        return y + self.base[i] if self.cross else y


def _replace_output(out: Any, new: torch.Tensor) -> Any:
    if isinstance(out, tuple):
        return (new, *out[1:])
    if isinstance(out, list):
        return [new, *out[1:]]
    return new


@contextmanager
def _hooks(llm: nn.Module, registrations: list[tuple[int, str, Any]]):
    """Register (layer, point, fn) hooks: fn(tensor) for input points; fn(tensor) -> tensor | None
    for output points (a tensor replaces the output). Removed on exit."""
    handles = []
    try:
        for layer, point, fn in registrations:
            module, kind = hook_module(llm, layer, point)
            if kind == "input":

                def pre(m, args, kwargs, fn=fn):
                    fn(args[0] if args else next(iter(kwargs.values())))

                handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            else:

                def post(m, args, out, fn=fn):
                    new = fn(output_tensor(out))
                    return None if new is None else _replace_output(out, new)

                handles.append(module.register_forward_hook(post))
        yield
    finally:
        for h in handles:
            h.remove()


def _keep_bos(orig: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``new  # [B, T, d]`` with position 0 taken from ``orig``, in ``orig``'s dtype."""
    new = new.to(orig.device, orig.dtype).clone()
    new[:, 0] = orig[:, 0]
    return new


def logits_of(llm: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return llm(input_ids=tokens, use_cache=False).logits


@torch.no_grad()
def forward_ablated(
    llm: nn.Module, tokens: torch.Tensor, spec: SpliceSpec, values: dict[int, torch.Tensor | None]
) -> torch.Tensor:
    """Logits with ``hook_out`` at LLM layer l set to ``values[l]  # [d]`` (None: zero), BOS kept."""

    def make(value):
        def fn(t):
            fill = torch.zeros_like(t) if value is None else value.to(t.device, t.dtype).expand_as(t)
            return _keep_bos(t, fill)

        return fn

    with _hooks(llm, [(layer, spec.hook_out, make(v)) for layer, v in values.items()]):
        return logits_of(llm, tokens)


@torch.no_grad()
def forward_replaced(
    llm: nn.Module,
    tokens: torch.Tensor,
    transcoder: nn.Module,
    spec: SpliceSpec,
    replace: list[int],
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ops: _LayerOps | None = None,
) -> torch.Tensor:
    """Logits with ``hook_out`` replaced by the dictionary at dictionary layers ``replace`` (indices
    into ``spec.layers``); inputs are read at every dictionary layer up to the last replaced one.
    ``ops``: how a layer runs (default the plain model's own pieces; a sharded model's are
    ``metrics.sharded_eval.ShardedLayerOps``)."""
    state = _Writes(transcoder, sorted(replace), chunk_elements, ops)
    same_point = spec.hook_in == spec.hook_out
    regs: list[tuple[int, str, Any]] = []
    for i in range(max(replace) + 1):
        layer = spec.layers[i]

        def read(t, i=i):
            state.read(i, t.reshape(-1, t.shape[-1]))

        def write(t, i=i):
            return _keep_bos(t, state.output(i).view(*t.shape[:-1], -1))

        if same_point:  # SAE: one hook reads the clean value, then returns the reconstruction

            def read_write(t, read=read, write=write, swap=i in replace):
                read(t)
                return write(t) if swap else None

            regs.append((layer, spec.hook_out, read_write))
        else:
            regs.append((layer, spec.hook_in, read))
            if i in replace:
                regs.append((layer, spec.hook_out, write))
    with _hooks(llm, regs):
        return logits_of(llm, tokens)


@torch.no_grad()
def hook_out_means(llm: nn.Module, batches: list[torch.Tensor], spec: SpliceSpec) -> dict[int, torch.Tensor]:
    """Mean of ``hook_out`` over the non-BOS positions of ``batches``, per LLM layer  # [d] fp32."""
    sums: dict[int, torch.Tensor] = {}
    count = 0

    def make(layer):
        def fn(t):
            s = t[:, 1:].float().sum((0, 1))
            sums[layer] = sums[layer] + s if layer in sums else s

        return fn

    with _hooks(llm, [(layer, spec.hook_out, make(layer)) for layer in spec.layers]):
        for tokens in batches:
            logits_of(llm, tokens)
            count += tokens.shape[0] * (tokens.shape[1] - 1)
    return {layer: s / max(count, 1) for layer, s in sums.items()}
