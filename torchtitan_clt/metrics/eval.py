"""Replacement-model evaluation: splice the dictionary into the LLM and compare next-token predictions.

Variants, all on the same held-out token batches ``[B, T]`` (position 0 is BOS):

- ``clean``: the LLM as is.
- ``closed loop``: at every covered layer the target hook (``hook_out``, e.g. ``mlp_out``) is
  replaced by the dictionary's output, computed from the input hook (``hook_in``) captured in the
  same, already patched forward. For a CLT the output at layer t needs the inputs of layers s ≤ t,
  so the forward is walked layer by layer: at layer s's input hook, source s is encoded and its
  write to every later target is added to a running sum; at layer t's target hook the sum over
  s ≤ t (plus the bias) replaces the activation.
- ``open loop`` (per layer t): only layer t is replaced; its inputs are the clean ones (nothing
  before t is patched).
- ``zero`` / ``mean`` ablation: the target hook set to 0 / to its mean over the eval tokens (all
  covered layers, and per layer for the open-loop baselines).

An SAE (``hook_in == hook_out``) is spliced at its own hook: the hook's output is replaced by its
reconstruction. The BOS position is never spliced (it keeps its clean activations: the dictionary
never saw it, and every later token attends to it) and predictions made at it are not scored.
Metrics (DESIGN.md): CE, ΔCE = CE − CE_clean, CE recovered = (CE_abl − CE) / (CE_abl − CE_clean)
for zero and mean ablation, KL(clean ‖ variant) and top-1 agreement with the clean model.

Only the public ``Transcoder`` API is used (``encode`` / ``decode`` on ``[N, L, d]`` tensors with
one layer filled). Source s's write is ``decode(A_s) − decode(0)`` with ``A_s`` holding only layer
s's features: exact for decoders that are affine in the features (PLT, CLT, SAE) and for any
decoder whose layer t reads only layer t's features. Cost: one full-width encode and decode per
covered layer and forward, in token chunks of bounded size.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from torchtitan_clt.data.hooks import POINT_ORDER, check_layers, check_point, hook_module, output_tensor

# Elements of one [chunk, L, max(F, d)] temporary: bounds the memory of encode/decode calls.
DEFAULT_CHUNK_ELEMENTS = 1 << 26


# --- next-token metrics -----------------------------------------------------------------------
def scored(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The scored predictions: logits at positions 1..T-2 for the tokens at 2..T-1.

    The prediction made at BOS (position 0) is left out. ``logits  # [B, T, V]`` ->
    (``[B*(T-2), V]``, ``[B*(T-2)]``)."""
    if tokens.shape[1] < 3:
        raise ValueError(f"evaluation windows need at least 3 tokens (BOS + 2), got {tokens.shape[1]}.")
    lg = logits[:, 1:-1]
    return lg.reshape(-1, lg.shape[-1]), tokens[:, 2:].reshape(-1).to(logits.device)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-prediction CE in nats: ``[N, V], [N] -> [N]`` (float32)."""
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")


def kl_divergence(clean_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-prediction KL(clean ‖ other) = Σ_v p_clean (log p_clean − log p_other): ``[N, V] x2 -> [N]``."""
    lp_c = clean_logits.float().log_softmax(-1)
    lp = logits.float().log_softmax(-1)
    return (lp_c.exp() * (lp_c - lp)).sum(-1)


def top1_agreement(clean_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-prediction 1.0 where both argmaxes agree: ``[N, V] x2 -> [N]``."""
    return (clean_logits.argmax(-1) == logits.argmax(-1)).float()


@dataclass
class NextTokenSums:
    """Sums over scored predictions (float64), so batches and chunks add up exactly."""

    ce: float = 0.0
    kl: float = 0.0
    top1: float = 0.0
    count: int = 0

    @torch.no_grad()
    def update(self, clean_logits: torch.Tensor, logits: torch.Tensor, tokens: torch.Tensor) -> None:
        for b in range(tokens.shape[0]):  # one row at a time: bounds the [T, V] fp32 temporaries
            lc, tgt = scored(clean_logits[b : b + 1], tokens[b : b + 1])
            lg, _ = scored(logits[b : b + 1], tokens[b : b + 1])
            self.ce += float(cross_entropy(lg, tgt).double().sum())
            self.kl += float(kl_divergence(lc, lg).double().sum())
            self.top1 += float(top1_agreement(lc, lg).double().sum())
            self.count += tgt.numel()

    def means(self) -> dict[str, float]:
        n = max(self.count, 1)
        return {"ce": self.ce / n, "kl": self.kl / n, "top1_agreement": self.top1 / n}


def ce_recovered(ce: float, ce_ablation: float, ce_clean: float) -> float:
    """(CE_ablation − CE) / (CE_ablation − CE_clean); NaN when the ablation changes nothing."""
    gap = ce_ablation - ce_clean
    return (ce_ablation - ce) / gap if abs(gap) > 1e-12 else float("nan")


# --- splicing ---------------------------------------------------------------------------------
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
            raise ValueError(f"transcoder args.layers {layers} does not have n_layers = {a.n_layers} entries.")
        check_point(a.hook_in)
        check_point(a.hook_out)
        if POINT_ORDER[a.hook_in] > POINT_ORDER[a.hook_out]:
            raise ValueError(
                f"hook_in {a.hook_in!r} comes after hook_out {a.hook_out!r} in a layer's forward: the "
                "dictionary's output could not depend on its input. Check the export's hook points."
            )
        return cls(check_layers(llm, layers), a.hook_in, a.hook_out)


class _Writes:
    """One patched forward's dictionary state: the running sum of every source's write.

    ``y  # [n, len(targets), d_out]``: Σ over the sources read so far of their write to each
    target the forward replaces; ``base  # [L, d_out]`` is decode(0), the bias path."""

    def __init__(self, transcoder: nn.Module, targets: list[int], chunk_elements: int):
        self.tc = transcoder
        a = transcoder.args
        self.L, self.F, self.d_in = a.n_layers, a.features_per_layer, a.d_in
        self.targets = targets
        ref = next(iter(transcoder.parameters()), None)
        self.device = ref.device if ref is not None else torch.device("cpu")
        self.base = transcoder.decode(torch.zeros(1, self.L, self.F, device=self.device))[0].float()
        self.chunk = max(1, chunk_elements // (self.L * max(self.F, a.d_in, a.d_out)))
        self.y: torch.Tensor | None = None

    def read(self, i: int, x: torch.Tensor) -> None:
        """Dictionary layer i's input ``x  # [n, d_in]``: add source i's write to the targets."""
        n = x.shape[0]
        if self.y is None:
            self.y = torch.zeros(n, len(self.targets), self.base.shape[-1], device=self.device)
        x = x.to(self.device, torch.float32)
        for r in range(0, n, self.chunk):
            xc = x[r : r + self.chunk]
            X = torch.zeros(xc.shape[0], self.L, self.d_in, device=self.device)
            X[:, i] = xc
            a = self.tc.encode(X)  # [c, L, F]; layer i depends on x_i only
            A = torch.zeros_like(a)
            A[:, i] = a[:, i]
            write = self.tc.decode(A).float() - self.base  # [c, L, d_out]
            self.y[r : r + self.chunk] += write[:, self.targets]

    def output(self, i: int) -> torch.Tensor:
        """Replacement at dictionary layer i  # [n, d_out]."""
        if self.y is None:
            raise RuntimeError(f"dictionary layer {i}: the target hook fired before any input hook.")
        return self.y[:, self.targets.index(i)] + self.base[i]


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


def _logits(llm: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
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
        return _logits(llm, tokens)


@torch.no_grad()
def forward_replaced(
    llm: nn.Module,
    tokens: torch.Tensor,
    transcoder: nn.Module,
    spec: SpliceSpec,
    replace: list[int],
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Logits with ``hook_out`` replaced by the dictionary at dictionary layers ``replace`` (indices
    into ``spec.layers``); inputs are read at every dictionary layer up to the last replaced one."""
    state = _Writes(transcoder, sorted(replace), chunk_elements)
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
        return _logits(llm, tokens)


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
            _logits(llm, tokens)
            count += tokens.shape[0] * (tokens.shape[1] - 1)
    return {layer: s / max(count, 1) for layer, s in sums.items()}


# --- evaluation -------------------------------------------------------------------------------
@dataclass
class Baselines:
    """What does not depend on the dictionary: computed once per (LLM, token batches, layers)."""

    spec: SpliceSpec
    means: dict[int, torch.Tensor]
    clean_ce: float
    zero: dict[str, float]
    mean: dict[str, float]
    zero_per_layer: list[dict[str, float]] = field(default_factory=list)
    mean_per_layer: list[dict[str, float]] = field(default_factory=list)


def _device_of(llm: nn.Module) -> torch.device:
    return next(llm.parameters()).device


@torch.no_grad()
def compute_baselines(
    llm: nn.Module, token_batches: Iterable[torch.Tensor], spec: SpliceSpec, per_layer: bool = True
) -> Baselines:
    """Clean CE, zero- and mean-ablation of every covered layer (and of each alone if ``per_layer``)."""
    dev = _device_of(llm)
    batches = [t.to(dev) for t in token_batches]
    means = hook_out_means(llm, batches, spec)
    clean = NextTokenSums()
    zero, mean = NextTokenSums(), NextTokenSums()
    n = len(spec.layers)
    zero_l = [NextTokenSums() for _ in range(n if per_layer else 0)]
    mean_l = [NextTokenSums() for _ in range(n if per_layer else 0)]
    for tokens in batches:
        lc = _logits(llm, tokens)
        clean.update(lc, lc, tokens)
        zero.update(lc, forward_ablated(llm, tokens, spec, dict.fromkeys(spec.layers)), tokens)
        mean.update(lc, forward_ablated(llm, tokens, spec, means), tokens)
        for i in range(len(zero_l)):
            layer = spec.layers[i]
            zero_l[i].update(lc, forward_ablated(llm, tokens, spec, {layer: None}), tokens)
            mean_l[i].update(lc, forward_ablated(llm, tokens, spec, {layer: means[layer]}), tokens)
    return Baselines(
        spec, means, clean.means()["ce"], zero.means(), mean.means(),
        [s.means() for s in zero_l], [s.means() for s in mean_l],
    )


def _summary(m: dict[str, float], clean_ce: float, zero_ce: float, mean_ce: float) -> dict[str, float]:
    return {
        "ce": m["ce"],
        "delta_ce": m["ce"] - clean_ce,
        "ce_recovered_zero": ce_recovered(m["ce"], zero_ce, clean_ce),
        "ce_recovered_mean": ce_recovered(m["ce"], mean_ce, clean_ce),
        "kl": m["kl"],
        "top1_agreement": m["top1_agreement"],
    }


@torch.no_grad()
def evaluate_replacement(
    llm: nn.Module,
    transcoder: nn.Module,
    token_batches: Iterable[torch.Tensor],
    *,
    open_loop: bool = True,
    baselines: Baselines | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> dict[str, Any]:
    """Closed-loop (and per-layer open-loop) replacement metrics on ``token_batches  # [B, T]``.

    ``llm``: a plain causal LM (``hook_module`` must know it). ``transcoder``: a plain
    ``Transcoder`` (on any device; evaluated in eval mode, its mode restored after).
    ``baselines``: from ``compute_baselines`` for the same batches, to skip recomputing them.
    Returns a JSON-ready dict (see ``docs`` in report.py for the keys)."""
    spec = SpliceSpec.of(transcoder, llm)
    dev = _device_of(llm)
    batches = [t.to(dev) for t in token_batches]
    if not batches:
        raise ValueError("evaluate_replacement: no token batches (the held-out text is empty?).")
    if baselines is None:
        baselines = compute_baselines(llm, batches, spec, per_layer=open_loop)
    if baselines.spec != spec:
        raise ValueError(f"baselines were computed for {baselines.spec}, not {spec}.")
    if open_loop and not baselines.zero_per_layer:
        raise ValueError("open_loop needs baselines computed with per_layer=True.")
    n = len(spec.layers)
    was_training = transcoder.training
    transcoder.eval()
    try:
        closed = NextTokenSums()
        opened = [NextTokenSums() for _ in range(n if open_loop else 0)]
        for tokens in batches:
            lc = _logits(llm, tokens)
            closed.update(lc, forward_replaced(llm, tokens, transcoder, spec, list(range(n)), chunk_elements), tokens)
            for i in range(len(opened)):
                opened[i].update(lc, forward_replaced(llm, tokens, transcoder, spec, [i], chunk_elements), tokens)
    finally:
        transcoder.train(was_training)

    b = baselines
    zce, mce = b.zero["ce"], b.mean["ce"]
    result: dict[str, Any] = {
        "tokens_scored": closed.count,
        "layers": list(spec.layers),
        "hook_in": spec.hook_in,
        "hook_out": spec.hook_out,
        "ce_clean": b.clean_ce,
        "closed_loop": _summary(closed.means(), b.clean_ce, zce, mce),
        "zero_ablation": _summary(b.zero, b.clean_ce, zce, mce),
        "mean_ablation": _summary(b.mean, b.clean_ce, zce, mce),
    }
    if open_loop:
        per = [
            _summary(opened[i].means(), b.clean_ce, b.zero_per_layer[i]["ce"], b.mean_per_layer[i]["ce"])
            for i in range(n)
        ]
        result["open_loop"] = {k: [p[k] for p in per] for k in per[0]}
        result["open_loop"]["ce_zero_ablation"] = [z["ce"] for z in b.zero_per_layer]
        result["open_loop"]["ce_mean_ablation"] = [m["ce"] for m in b.mean_per_layer]
    return result


def headline(result: dict[str, Any], prefix: str = "eval_") -> dict[str, Any]:
    """Flat scalars (and per-layer lists) for ``MetricsLogger.log``."""
    c = result["closed_loop"]
    out: dict[str, Any] = {
        f"{prefix}ce_clean": result["ce_clean"],
        f"{prefix}ce_replacement": c["ce"],
        f"{prefix}delta_ce": c["delta_ce"],
        f"{prefix}ce_recovered_zero": c["ce_recovered_zero"],
        f"{prefix}ce_recovered_mean": c["ce_recovered_mean"],
        f"{prefix}kl": c["kl"],
        f"{prefix}top1_agreement": c["top1_agreement"],
    }
    if "open_loop" in result:
        out[f"{prefix}open_ce_recovered_zero_per_layer"] = list(result["open_loop"]["ce_recovered_zero"])
    return out
