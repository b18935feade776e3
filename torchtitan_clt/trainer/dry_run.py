"""What a traced run substitutes: the pieces that need values, files or a network, replaced by
stand-ins of the same sizes, so that the rest of the trainer runs as it is on fake tensors.

``scripts/estimate_memory.py`` runs the real ``Trainer`` (build -> standardization -> refills ->
steps -> checkpoint -> end of run) under ``FakeTensorMode`` with a fake process group of the
config's world size, one rank simulated (``tools/fake_world.py``), counting every tensor
(``tools/mem_trace.py``). Each substitution below is listed in the report (``SUBSTITUTIONS``):

- the LLM is built from its config (no weights are read) and the text is a stream of random token
  windows of the configured shape (no dataset, no tokenizer);
- kernels run their torch fallback (Triton needs real pointers; the caller sets
  ``kernels.backend = "torch"``);
- what depends on values is set to its expected size (``Expectations``): the width of a sparse
  selection (the widest of N·L rows, drawn as Poisson counts of the expected mean), the entries a
  selection keeps, the candidate count of the distributed k-th largest; finite checks pass;
- a checkpoint save stages every local tensor into (pinned) host memory as DCP's async save does
  and writes nothing; exports count the bytes they would write;
- object collectives return this rank's own object for every rank; ``new_group`` gives fake groups;
- under tensor parallelism this rank owns every chunk of a refill (it extracts each one and sends
  it): the owner's side of the deal holds the most (its whole extraction, then the pieces it
  sends), and every rank is the owner of some chunks.
"""

from __future__ import annotations

import contextlib
import math
import sys
import weakref
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset

from torchtitan_clt.config import ConfigError

SUBSTITUTIONS = [
    "LLM built from its config straight on the device (no weights read, no host copy); text: random token windows of "
    "[data.llm_batch_size, data.seq_len] (no dataset or tokenizer read)",
    "kernels: the torch fallback (Triton kernels need real memory); its CPU sampled matmul "
    "allocates one value per entry (fake tensors cannot be sparse CSR)",
    "value-dependent sizes set to their expectation: a selection's padded width = the widest of the "
    "batch's rows as Poisson counts of the mean (k per token and layer, split over feature shards); "
    "entries kept = the mean; finite checks pass; dead features: none",
    "checkpoint: every local tensor staged to host memory (pinned on GPU) as DCP's async save does; "
    "nothing written (the small pickled states hold each tensor's shape instead of its values)",
    "exports: the bytes they would write are counted, nothing written",
    "object collectives: every rank gives this rank's object; new process groups are fake ones",
    "tensor-parallel refills: this rank owns (extracts and broadcasts) every chunk, the side of "
    "the deal that holds the most",
]

# Configs of well-known LLMs, so that the trace and the estimate work offline (their config.json).
KNOWN_LLMS = {
    "meta-llama/Llama-3.1-8B": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
        max_position_embeddings=131072, rope_theta=500000.0,
    ),
    "meta-llama/Llama-3.2-1B": dict(
        model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
    ),
    "google/gemma-2-2b": dict(
        model_type="gemma2", hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=256000,
    ),
}  # fmt: skip


def llm_config(model_path: str) -> Any:
    """The LLM's ``transformers`` config, offline: a local folder (or ``gguf:`` conversion), the
    Hugging Face cache, or ``KNOWN_LLMS``."""
    from transformers import AutoConfig

    if model_path in KNOWN_LLMS:
        kw = dict(KNOWN_LLMS[model_path])
        return AutoConfig.for_model(kw.pop("model_type"), **kw)
    path = model_path
    if model_path.startswith("gguf:"):
        from torchtitan_clt.data.llm import prepare_gguf

        path = str(prepare_gguf(model_path))
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means: we cannot know it offline
        raise ConfigError(
            f"Cannot read the config of data.model_path = {model_path!r} offline ({e}); give a local "
            f"folder, download it once, or add it to KNOWN_LLMS in {__file__}."
        ) from None


class StandInTokenizer:
    """Ids only: what the traced pipeline asks of a tokenizer."""

    def __init__(self, vocab_size: int, bos: int = 1, eos: int = 2):
        self.vocab_size = vocab_size
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos, eos, eos

    def __len__(self) -> int:
        return self.vocab_size

    def decode(self, ids: Any, **kw: Any) -> str:
        return " ".join(f"<{int(i)}>" for i in ids) if hasattr(ids, "__iter__") else f"<{int(ids)}>"

    def convert_ids_to_tokens(self, ids: Any) -> Any:
        return [f"<{int(i)}>" for i in ids] if hasattr(ids, "__iter__") else f"<{int(ids)}>"


class SyntheticWindows(IterableDataset):
    """Random token windows ``[seq_len]`` starting with BOS: ``PackedTokens``' interface and state."""

    def __init__(
        self, spec: Any, tokenizer: Any, seq_len: int, dp_rank: int = 0, dp_degree: int = 1, **kw: Any
    ):
        self.tokenizer, self.seq_len = tokenizer, seq_len
        self.vocab = len(tokenizer) if hasattr(tokenizer, "__len__") else 32000
        self.loop = kw.get("loop", True)
        self.start: dict[int, dict[str, Any]] = {}
        self.windows_read = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        n = 0
        while self.loop or n < 64:
            w = torch.randint(3, self.vocab, (self.seq_len,))
            w[0] = self.tokenizer.bos_token_id
            self.windows_read += 1
            n += 1
            yield w

    @property
    def windows(self) -> int:
        return self.windows_read

    def state_dict(self) -> dict[str, Any]:
        return {"windows": self.windows_read}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.windows_read = int(sd.get("windows", 0))


def fake_llm_handle(job_config: Any, device: torch.device | str = "cpu", dtype: str = "") -> Any:
    """``data.pipeline.load_llm_handle`` without weights: the model built from its config."""
    from transformers import AutoModelForCausalLM

    from torchtitan_clt.data.llm import resolve_dtype
    from torchtitan_clt.data.pipeline import LLMHandle

    d = job_config.data
    conf = llm_config(d.model_path)
    device = torch.device(device)
    # the meta device stands for a GPU here (tools/fake_world): "auto" resolves as on CUDA
    torch_dtype = resolve_dtype(dtype or d.model_dtype, "cuda" if device.type == "meta" else device)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(conf, torch_dtype=torch_dtype)
    model.to_empty(device=device).eval().requires_grad_(False)  # weights never read: any values
    return LLMHandle(model, StandInTokenizer(conf.vocab_size))


# -- value oracle ----------------------------------------------------------------------------------
def poisson_max(mean: float, n: int) -> int:
    """The widest of ``n`` rows whose counts are Poisson(``mean``): the smallest K with
    n·P(X > K) < 1/2 (the padded width a batch of n rows most likely needs)."""
    if mean <= 0:
        return 0
    if n <= 1:
        return max(1, math.ceil(mean))
    log_p = -mean  # log P(X = 0)
    cdf, k = math.exp(log_p), 0
    while n * (1.0 - cdf) >= 0.5 and k < 100 * mean + 100:
        k += 1
        log_p += math.log(mean) - math.log(k)
        cdf += math.exp(log_p)
    return max(k, 1)


class Expectations:
    """Answers what fake tensors cannot: the values the sizes of a sparse step depend on, by the
    function that reads them (``scalar`` / ``count``, called by ``MemTracer``), from the config's
    ``k`` and ``features_per_layer``. Every read site it does not know is answered with a neutral
    value (True, 0, 1.0) and listed in ``unknown`` for the report."""

    def __init__(self, k: int, n_features: int, activation: str):
        self.k, self.n_features, self.activation = k, n_features, activation
        self.unknown: dict[str, int] = {}
        self._elements: dict[int, tuple[Any, int]] = {}

    def _frame(self, names: set[str]) -> Any:
        f = sys._getframe(2)
        while f is not None:
            if f.f_code.co_name in names and "torchtitan_clt" in f.f_code.co_filename:
                return f
            f = f.f_back
        return None

    def _site(self) -> str:
        f = sys._getframe(2)
        while f is not None:
            fn = f.f_code.co_filename
            if "torchtitan_clt" in fn and "fake_world" not in fn and "mem_trace" not in fn:
                return f"{Path(fn).name}:{f.f_lineno} ({f.f_code.co_name})"
            f = f.f_back
        return "torch internals"

    def kept_per_row(self, local_features: int, width: int) -> float:
        """Mean entries a (row, layer) keeps on a rank holding ``local_features`` features."""
        return min(float(width), self.k * local_features / max(self.n_features, 1))

    def scalar(self, t: torch.Tensor) -> Any:
        from torchtitan_clt.tools.fake_world import known_value

        known = known_value(t)
        if known is not None:  # a small host tensor copied to the fake device: its own value
            return known
        names = {
            "global_kth_largest",
            "_keep_at_least",
            "_build",
            "_entry_count",
            "_widest_row",
            "_pack_size",
            "_repack",
        }
        f = self._frame(names)
        if f is not None:
            loc, name = f.f_locals, f.f_code.co_name
            if name == "_pack_size":  # every rank holds about its share: the own count
                return int(loc["own"])
            if name == "_repack":  # TopK's exact-k rows on this rank: its share of k, widest row
                keep, rows = loc["keep"], loc["keep"][..., 0].numel()
                return min(keep.shape[-1], poisson_max(self.kept_per_row(loc["f"], keep.shape[-1]), rows))
            if name == "_entry_count":  # the code layout's gathered entries: k per (row, layer)
                return round(loc["rows"] * self.kept_per_row(loc["f_total"], loc["f_total"]))
            if name == "_widest_row":
                rows = loc["per_row"].numel()
                return min(
                    loc["f_total"], poisson_max(self.kept_per_row(loc["f_total"], loc["f_total"]), rows)
                )
            if name == "global_kth_largest":
                return int(loc["m"])  # each rank's values above the bound: about its share
            if name == "_keep_at_least":
                h, idx = loc["h"], loc["idx"]
                rows = h.shape[0] * h.shape[1]
                return min(idx.shape[-1], poisson_max(self.kept_per_row(h.shape[-1], idx.shape[-1]), rows))
            if name == "_build":  # Layout: cumulative entries per layer, read element by element
                n, k, nf = loc["n"], loc["k"], loc["n_features"]
                per_layer = round(n * self.kept_per_row(nf, k))
                # Counted per tensor being read (an id alone can be a freed one's, reused).
                ends = loc["layer_ends"]
                ref, i = self._elements.get(id(ends), (None, 0))
                if ref is None or ref() is not ends:
                    ref, i = weakref.ref(ends), 0
                self._elements[id(ends)] = (ref, i + 1)
                return per_layer * (i + 1)
        site = self._site()
        self.unknown[site] = self.unknown.get(site, 0) + 1
        if t.dtype == torch.bool:
            return True
        if t.dtype.is_floating_point:
            return 1.0
        return 0

    def count(self, t: torch.Tensor) -> int:
        """Rows of ``nonzero(t)``."""
        f = self._frame({"_build", "_own_entries"})
        if f is not None:
            loc = f.f_locals
            if f.f_code.co_name == "_own_entries":  # a rank's share of the code layout's entries
                return round(loc["rows"] * self.kept_per_row(loc["f_local"], loc["width"]))
            return round(loc["n"] * loc["n_layers"] * self.kept_per_row(loc["n_features"], loc["k"]))
        site = self._site()
        self.unknown[f"{site} nonzero"] = self.unknown.get(f"{site} nonzero", 0) + 1
        return t.numel()


class ExpectedSelection:
    """The torch fallback's selections, by their expected sizes (its block candidates and masks
    depend on values at every step): ``batchtopk_select`` keeps ``k_total`` entries spread evenly
    over the rows (a rank's local pick with the global budget, before the global threshold), padded
    to the widest row; ``compact`` keeps the mean a (row, layer) keeps (``Expectations``)."""

    def __init__(self, oracle: Expectations):
        self.oracle = oracle

    @staticmethod
    def _ids(n: int, groups: int, width: int, f: int, device: Any) -> torch.Tensor:
        return torch.empty((n, groups, width), dtype=torch.long, device=device)

    def batchtopk_select(self, h: torch.Tensor, k_total: int, scope: str = "layer", positive: bool = True):
        n, n_layers, f = h.shape
        per_row = k_total / max(1, n * n_layers)  # per (row, layer), both scopes
        width = min(f, poisson_max(per_row, n * n_layers))
        tau = torch.empty((n_layers,), dtype=torch.float32, device=h.device)
        return self._ids(n, n_layers, width, f, h.device), tau

    def compact(self, h: torch.Tensor, tau: torch.Tensor, mode: str = "positive") -> torch.Tensor:
        n, groups, f = h.shape
        width = min(f, poisson_max(self.oracle.kept_per_row(f, f), n * groups))
        return self._ids(n, groups, width, f, h.device)


# -- substitutions ---------------------------------------------------------------------------------
@contextlib.contextmanager
def patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    """``obj.name`` is ``value`` inside the block."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


class Staging:
    """DCP's async save as far as memory goes: a host copy of every local tensor of the state,
    held until the save is waited for (DCP's own stager is closed, and its copy dropped, once the
    write is done); traffic counted as device -> host."""

    def __init__(self, pin: bool):
        self.pin = pin
        self.staged: list[torch.Tensor] = []
        self.staged_bytes = 0
        self.saves = 0

    def __call__(self, state_dict: Any, *args: Any, **kwargs: Any) -> Future:
        from torch.utils._pytree import tree_flatten

        self.staged = []
        flat, _ = tree_flatten(state_dict)
        for t in flat:
            if isinstance(t, torch.Tensor):
                local = getattr(t, "_local_tensor", t)
                host = torch.empty(local.shape, dtype=local.dtype, device="cpu", pin_memory=self.pin)
                host.copy_(local)
                self.staged.append(host)
        self.saves += 1
        self.staged_bytes = max(self.staged_bytes, sum(t.numel() * t.element_size() for t in self.staged))
        fut: Future = Future()
        fut.set_result(None)
        return fut

    def released_on_wait(self, wait: Any) -> Any:
        """``CheckpointManager.wait`` that also drops the staged copy: the run waits there for
        the write, after which DCP's stager no longer holds it."""

        def wait_and_release(manager: Any) -> None:
            wait(manager)
            self.staged = []

        return wait_and_release


class WriteCounter:
    """``safetensors.torch.save_file`` that counts instead of writing."""

    def __init__(self) -> None:
        self.bytes = 0
        self.files = 0
        self.largest = 0

    def __call__(self, tensors: dict[str, torch.Tensor], filename: Any = None, metadata: Any = None) -> None:
        n = sum(t.numel() * t.element_size() for t in tensors.values())
        self.add(n)
        self.files += 1
        self.largest = max(self.largest, n)

    def add(self, n: int) -> None:
        self.bytes += n


@contextlib.contextmanager
def substitutions(pin: bool, oracle: Expectations) -> Iterator[dict[str, Any]]:
    """Install every stand-in above; yields the counters (staging, exports)."""
    import safetensors.torch
    import torch.distributed.checkpoint as dcp

    from torchtitan_clt.checkpoint.manager import CheckpointManager
    from torchtitan_clt.data import buffer, pipeline, source, tokenize
    from torchtitan_clt.kernels import select_torch
    from torchtitan_clt.trainer import nonfinite

    staging, writes = Staging(pin), WriteCounter()
    real_new_group = dist.new_group

    def new_group(*args: Any, **kwargs: Any) -> Any:
        kwargs["backend"] = "fake"
        if len(args) >= 3:
            args = (*args[:2], None, *args[3:])
        return real_new_group(*args, **kwargs)

    def all_gather_object(out: list, obj: Any, group: Any = None) -> None:
        for i in range(len(out)):
            out[i] = obj

    def broadcast_object_list(
        objs: list, src: int = 0, group: Any = None, device: Any = None, **kw: Any
    ) -> None:
        pass

    with contextlib.ExitStack() as stack:
        for mod in (pipeline, source):
            if hasattr(mod, "load_llm_handle"):
                stack.enter_context(patched(mod, "load_llm_handle", fake_llm_handle))
        stack.enter_context(patched(tokenize, "PackedTokens", SyntheticWindows))
        # the CPU decoder's sampled matmul on a CSR pattern: fake tensors cannot make CSR tensors;
        # what it allocates is one value per entry
        real_csr, real_sampled = torch.sparse_csr_tensor, torch.sparse.sampled_addmm

        class _Pattern:
            def __init__(self, values: torch.Tensor):
                self._values = values

            def values(self) -> torch.Tensor:
                return self._values

        def csr(crow: Any, col: Any, values: Any, *args: Any, **kwargs: Any) -> Any:
            from torchtitan_clt.tools.fake_world import _is_fake

            return _Pattern(values) if _is_fake(values) else real_csr(crow, col, values, *args, **kwargs)

        def sampled(pattern: Any, a: Any, b: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(pattern, _Pattern):
                return _Pattern(
                    torch.empty_like(pattern.values(), dtype=torch.promote_types(a.dtype, b.dtype))
                )
            return real_sampled(pattern, a, b, *args, **kwargs)

        stack.enter_context(patched(torch, "sparse_csr_tensor", csr))
        stack.enter_context(patched(torch.sparse, "sampled_addmm", sampled))
        expected = ExpectedSelection(oracle)
        stack.enter_context(patched(select_torch, "batchtopk_select", expected.batchtopk_select))
        stack.enter_context(patched(select_torch, "compact", expected.compact))
        if hasattr(buffer, "ChunkShare"):
            stack.enter_context(patched(buffer.ChunkShare, "owner", lambda self, first, c: self.rank))
        finite = lambda self, p: [1] * (p.flags.numel() - 1) + [0]  # noqa: E731 - a step's flags: all finite
        stack.enter_context(patched(nonfinite.NonFiniteGuard, "_read", finite))
        stack.enter_context(patched(dist, "new_group", new_group))
        stack.enter_context(patched(dist, "all_gather_object", all_gather_object))
        stack.enter_context(patched(dist, "broadcast_object_list", broadcast_object_list))
        real_torch_save = torch.save

        def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            # fake tensors cannot be pickled: what is saved shows their shape instead
            from torch.utils._pytree import tree_map

            def shown(t: Any) -> Any:
                return ("tensor", tuple(t.shape), str(t.dtype)) if isinstance(t, torch.Tensor) else t

            real_torch_save(tree_map(shown, obj), f, *args, **kwargs)

        stack.enter_context(patched(torch, "save", save))
        stack.enter_context(patched(dcp, "async_save", staging))
        stack.enter_context(patched(dcp, "save", staging))
        stack.enter_context(
            patched(CheckpointManager, "wait", staging.released_on_wait(CheckpointManager.wait))
        )
        try:
            from torchtitan_clt.checkpoint import safetensors_stream as sts
        except ImportError:  # pragma: no cover - older layout
            sts = None
        if sts is not None:
            real_rank = sts._dtype_rank

            def dtype_rank(dtype: torch.dtype) -> int:
                from torch.utils._python_dispatch import _disable_current_modes

                with _disable_current_modes():  # a tiny real blob: the installed safetensors' order
                    return real_rank(dtype)

            def put(self: Any, piece: torch.Tensor) -> None:  # the real write, without the bytes
                self.f.seek(piece.numel() * piece.element_size(), 1)
                writes.add(piece.numel() * piece.element_size())

            stack.enter_context(patched(sts, "_dtype_rank", dtype_rank))
            stack.enter_context(patched(sts.StreamedFile, "_put", put))
        real_save = safetensors.torch.save_file
        for mod in [safetensors.torch, *list(sys.modules.values())]:
            name = getattr(mod, "__name__", "")
            if (name.startswith("torchtitan_clt") or mod is safetensors.torch) and getattr(
                mod, "save_file", None
            ) is real_save:
                stack.enter_context(patched(mod, "save_file", writes))
        yield {"staging": staging, "writes": writes}
