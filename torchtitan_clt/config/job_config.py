"""The job configuration: one dataclass per section, every field typed, defaulted and documented.

The docstring right under a field is what ``--help`` prints for it. ``Literal`` types list the
valid choices; the loader checks them before any work starts. Over 400 lines on purpose: every
field a user can set is in this one file, documented where it is declared (as TorchTitan's
``job_config.py``); the code that reads a section lives with its component.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# Families whose target differs from their input and whose decoder is the features' alone: the
# ones ``model.skip_connection`` applies to.
SKIP_FAMILIES = ("clt", "matryoshka_clt", "plt")


@dataclass
class Job:
    dump_folder: str = "./outputs"
    """Root of all run folders; a run writes into ``<dump_folder>/<name>/``."""

    name: str = "run"
    """Run name: the run folder under ``dump_folder``."""

    description: str = ""
    """Free text saved with the run."""

    seed: int = 0
    """Seed for weight init, data order and every RNG; the same seed gives the same run."""

    custom_import: list[str] = field(default_factory=list)
    """Python modules (dotted names or ``.py`` paths) imported before anything is built, so that
    they can register their own families, activations or data sources."""

    deterministic: bool = False
    """Ask PyTorch for deterministic algorithms (slower on GPU)."""


@dataclass
class Model:
    name: str = "clt"
    """Registered family: ``clt``, ``plt``, ``sae``, ``molt``, ``matryoshka_clt`` (and whatever
    ``job.custom_import`` registers)."""

    activation: str = "jumprelu"
    """Activation function: ``relu``, ``jumprelu``, ``topk``, ``batchtopk`` (or a registered one)."""

    features_per_layer: int = 4096
    """Dictionary features per layer (F)."""

    k: int = 32
    """Active features per token and layer for ``topk`` / ``batchtopk`` (BatchTopK keeps k·B per
    layer, or k·B·L across layers)."""

    batchtopk_scope: Literal["layer", "all"] = "layer"
    """BatchTopK selection per layer (``layer``) or jointly across all layers (``all``)."""

    jumprelu_threshold_init: float = 0.03
    """Initial JumpReLU threshold θ (in standardized pre-activation units)."""

    jumprelu_bandwidth: float = 0.1
    """Width ε of the rectangle kernel used by JumpReLU's straight-through estimator."""

    threshold_ema_decay: float = 0.99
    """EMA decay of the TopK/BatchTopK inference threshold (the smallest selected pre-activation)."""

    dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype of the dictionary's parameters (the optimizer keeps fp32 master weights via FSDP
    mixed precision on GPU)."""

    decoder_init_norm: float = 0.0
    """Norm of each feature's initial decoder row; 0 picks the family default."""

    decoder_unit_norm: Literal["auto", "true", "false"] = "false"
    """Keep each feature's whole decoder row at norm 1 through training (gradient along the row
    removed before each step, row renormalized after). ``auto``: on for TopK and BatchTopK, whose
    selection otherwise depends on how a feature splits its scale between encoder and decoder.
    Off by default: on the quality benchmark it left the held-out FVU within noise
    (benchmarks/results/defaults.md)."""

    tied_init: bool = True
    """Initialize the encoder as the transpose of the decoder."""

    skip_connection: Literal["auto", "true", "false"] = "auto"
    """A linear path from each layer's input to its own target, trained with the features:
    ŷ_l += x_l W_skip,l (``W_skip  # [L, d_in, d_out]``, zero at init), as in skip transcoders
    (Paulo et al. 2025, "Transcoders beat sparse autoencoders for interpretability"). The
    features are left to explain what a linear map cannot. ``clt``, ``matryoshka_clt`` and
    ``plt`` only (an SAE's skip path would be the identity; a MOLT's transforms already are linear
    maps of the input). ``auto``: on for those families (it lowered the quality benchmark's
    held-out FVU the most of everything tried: benchmarks/results/defaults.md), off for the others. Exported
    natively, to circuit-tracer (``W_skip``; ``load_clt_skip`` for a CLT) and to sae-lens."""

    b_dec_init: Literal["auto", "zero", "mean"] = "auto"
    """Initial output bias: ``zero``, or ``mean`` (the target mean, estimated with the
    standardization statistics before step 1; in standardized units it is 0 when targets are
    centered). ``auto``: ``mean`` for ``sae``, ``zero`` for the other families."""

    molt_ranks: list[int] = field(default_factory=lambda: [512, 256, 128, 64, 32])
    """``molt``: rank of each group of transforms, largest first."""

    molt_counts: list[int] = field(default_factory=list)
    """``molt``: transforms per group (summing to ``features_per_layer``). Empty: counts double
    from group to group (N, 2N, 4N, ...), N = features_per_layer // (2^groups − 1), the last group
    taking the remainder."""

    matryoshka_prefixes: list[int] = field(default_factory=list)
    """``matryoshka_clt``: nested feature-prefix sizes m_1 < ... < m_G (features_per_layer is
    appended when missing). Empty: F/16, F/8, F/4, F/2, F."""

    options: dict[str, Any] = field(default_factory=dict)
    """The options of a family registered from ``job.custom_import`` (its ``ModelSpec.options``
    dataclass), written as [model] keys of their own (``--model.my_option=3``); the trainer
    checks them against the family once it is imported."""


@dataclass
class Loss:
    lambda_sparsity: float = 1e-3
    """Coefficient λ of the sparsity term (final value, reached after the warm-up)."""

    sparsity: Literal["tanh", "l1", "none"] = "tanh"
    """Sparsity penalty: Σ tanh(c·a·‖W_dec‖), plain decoder-norm weighted L1, or none (TopK)."""

    tanh_c: float = 4.0
    """Scale c inside the tanh penalty."""

    decoder_norm: Literal["concat", "sum"] = "concat"
    """How a CLT feature's decoder norm is taken over its targets: norm of the concatenation, or
    sum of per-target norms."""

    lambda_warmup_steps: int = 0
    """Steps over which λ ramps linearly from 0 to ``lambda_sparsity``."""

    lambda_preact: float = 0.0
    """Coefficient of the pre-activation loss Σ ReLU(θ − h)·‖W_dec‖ that revives dead features."""

    lambda_preact_warmup_steps: int = 0
    """Steps over which the pre-activation coefficient ramps linearly from 0 to ``lambda_preact``."""

    auxk_alpha: float = 0.0
    """Coefficient α of the AuxK loss ‖e − ê‖²/‖e − ē‖² (the k_aux largest dead pre-activations
    reconstruct the residual e = y − ŷ), relative to the FVU as in Gao et al. (1/32) and sparsify:
    the term enters the loss as α·L·d_out·AuxK, ``recon`` being a sum over the L·d_out
    standardized target dimensions. 0 disables it (the default: on the quality benchmark it lowered
    the dead fraction but not the held-out FVU beyond noise, and its dense top-k over the dead
    features slows the run; benchmarks/results/defaults.md)."""

    auxk_k: int = 512
    """Dead features used by AuxK per token."""

    dead_after_tokens: int = 0
    """A feature that has not fired for this many tokens counts as dead (logged as ``dead``;
    what AuxK revives). 0 (auto): 1/20 of the run's tokens, at most 10 M, so that the rule acts
    on a short run as on a long one."""


@dataclass
class Data:
    source: str = "stream"
    """Where activations come from: ``stream`` (LLM forward on text), ``cache`` (activation cache
    on disk), ``synthetic`` (random, for benchmarks)."""

    model_path: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    """LLM to read activations from: a hub name or a local folder (``gguf:PATH`` loads a GGUF file,
    converted once into a cached safetensors folder)."""

    model_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """LLM dtype: ``auto`` is bf16 on GPU and fp32 on CPU."""

    dataset: str = "shakespeare"
    """Text: a Hugging Face dataset name (streamed), a local file, folder or glob (txt, jsonl,
    parquet), or ``shakespeare`` for the plays the demo package ships."""

    dataset_config: str = ""
    """Hugging Face dataset config name, if it has several."""

    dataset_split: str = "train"
    """Dataset split to read."""

    text_field: str = "text"
    """Column / JSON key holding the text."""

    seq_len: int = 128
    """Tokens per context window (including the BOS token, which is never trained on)."""

    hook_in: Literal["resid_mid", "mlp_in", "mlp_out", "resid_post"] = "resid_mid"
    """Hook point read as the dictionary's input."""

    hook_out: Literal["resid_mid", "mlp_in", "mlp_out", "resid_post"] = "mlp_out"
    """Hook point read as the dictionary's target."""

    layers: list[int] = field(default_factory=list)
    """LLM layers the dictionary covers (empty: all); the forward stops after the last one."""

    llm_batch_size: int = 8
    """Contexts per LLM forward."""

    buffer_tokens: int = 65_536
    """Activation rows the shuffle buffer holds; each refill is shuffled and drained."""

    buffer_passes: int = 1
    """Times each refill is drained (reshuffled each time) before the next: >1 reuses extracted
    activations, trading freshness for speed when extraction is the bottleneck."""

    buffer_device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the shuffle buffer lives: ``auto`` is the training device."""

    num_workers: int = 0
    """DataLoader worker processes: tokenization (``stream``), shard reading (``cache``)."""

    text_shards: int = 0
    """Virtual shards the data is split into, each with its own position, so that a resume on
    another number of ranks sees every context exactly once: the text (``stream``; ``0``: text
    readers, i.e. data-parallel × tensor-parallel ranks, × max(1, num_workers) of the first run) or
    each epoch's block order (``cache``; ``0``: the first run's data-parallel ranks). Fixed for the
    run (kept across resumes); a run cannot resume on more readers than shards, so set it to a
    multiple of every reader count you may resume on."""

    cache_dir: str = ""
    """Activation cache folder for ``source = "cache"`` (written by scripts/cache_activations.py)."""

    cache_shuffle: bool = True
    """``cache`` source: read the cache's blocks (one LLM batch of contexts each) in a seeded order,
    new every epoch. ``false`` reads them in the order they were written, which gives exactly the
    batches the ``stream`` source serves on the same text (same seed and buffer settings)."""

    prefetch: bool = True
    """Extract the next buffer refill in a background thread (its own CUDA stream on GPU) while the
    current one is drained, so the step does not wait for the LLM. Same batches either way; costs a
    second buffer's memory. Works under tensor parallelism too (the group's broadcasts of the
    refill run on the thread, over a process group of the data's own)."""

    synthetic_n_layers: int = 4
    """``synthetic`` source: layers."""

    synthetic_d_model: int = 256
    """``synthetic`` source: width."""


@dataclass
class Standardize:
    inputs: Literal["none", "scalar", "per_dim"] = "per_dim"
    """Standardize inputs per layer by a scalar or per dimension (``per_dim``: each dimension
    centered and scaled to unit variance; the default because it gave the lower held-out FVU on
    the quality benchmark: benchmarks/results/defaults.md)."""

    targets: Literal["none", "scalar", "per_dim"] = "per_dim"
    """Standardize targets per layer by a scalar or per dimension (see ``inputs``)."""

    estimate_tokens: int = 65_536
    """Tokens used to estimate the statistics before step 1."""


@dataclass
class Training:
    steps: int = 1000
    """Optimizer steps."""

    batch_size: int = 4096
    """Tokens (activation rows) per optimizer step."""

    grad_accum_steps: int = 1
    """Micro-batches per optimizer step (``batch_size`` is split between them)."""

    max_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""

    mixed_precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast dtype of the dictionary's forward: ``auto`` is bf16 on GPU and fp32 on CPU.
    ``fp16`` is refused (it would train without loss scaling); use ``bf16``."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Training device; ``auto`` picks CUDA when available."""

    nonfinite_check: Literal["auto", "every_step", "deferred"] = "auto"
    """How a NaN / inf in the activations, the loss or the gradients stops the run. ``every_step``:
    checked between forward and backward (one host sync per micro-batch; the error counts the NaNs
    per layer and names the loss terms). ``deferred``: the step's flags stay on the device, the
    fused optimizer skips that step's update there, and the host reads them two steps later and
    before every logged step, checkpoint and the end of training (no sync; the error names the
    step and the layers). ``auto``: ``deferred`` on CUDA with a fused optimizer, else ``every_step``."""

    compile: bool = False
    """``torch.compile`` the dictionary's forward."""


@dataclass
class Optimizer:
    name: Literal["adamw", "adam"] = "adamw"
    """Optimizer."""

    lr: float = 2e-4
    """Peak learning rate."""

    beta1: float = 0.9
    """Adam β1."""

    beta2: float = 0.999
    """Adam β2."""

    eps: float = 1e-8
    """Adam ε."""

    weight_decay: float = 0.0
    """Decoupled weight decay."""

    fused: Literal["auto", "true", "false"] = "auto"
    """Fused AdamW kernel (``auto``: on wherever supported)."""


@dataclass
class LRScheduler:
    warmup_steps: int = 0
    """Linear warm-up steps from ``warmup_start_factor``·lr."""

    warmup_start_factor: float = 0.0
    """Learning-rate factor at step 0 of the warm-up."""

    decay_type: Literal["constant", "linear", "cosine"] = "linear"
    """Shape of the decay that ends the run."""

    decay_ratio: float = 0.2
    """Fraction of the steps spent decaying at the end (warmup-stable-decay); 1.0 decays throughout."""

    min_lr_factor: float = 0.0
    """Learning-rate factor reached at the last step."""


@dataclass
class Parallelism:
    dp_replicate: int = 1
    """Data-parallel replicas (HSDP's outer dimension)."""

    dp_shard: int = -1
    """FSDP shard degree; -1 takes every rank left over after ``dp_replicate`` and ``tp``."""

    tp: int = 1
    """Tensor-parallel degree: features are sharded over it."""

    tp_layout: Literal["features", "code"] = "features"
    """How tp splits the decoder. ``features``: each rank decodes its own features into a dense
    partial ŷ [B, L, d_out], summed over tp (fp32 all-reduce, traffic ∝ B·L·d). ``code``: the
    encoder stays sharded over features, the selected (value, feature id) entries are gathered
    over tp and the decoder, skip path and b_dec are sharded over d_out, so each rank writes its
    own slice of ŷ and takes the loss on its slice of y (traffic ∝ B·L·k; issue 27). Families
    declare it with ``ModelSpec.tp_code_plan``."""

    fsdp_reshard_after_forward: Literal["default", "always", "never"] = "default"
    """FSDP2 reshard policy after forward."""

    gloo_ring_collectives: bool = True
    """On gloo (CPU), FSDP2 gathers parameters and reduces gradients with point-to-point rings
    instead of gloo's all-gather / reduce-scatter, which are slower between processes on one host;
    NCCL always keeps its own."""

    gloo_shared_memory: bool = True
    """On gloo (CPU), when a shard group's ranks share one host, FSDP2's all-gather and
    reduce-scatter go through a ``/dev/shm`` segment instead of loopback TCP (checked at start;
    where it cannot be used, e.g. ranks on several hosts or a full ``/dev/shm``, the rings or
    gloo's own collectives run, per ``gloo_ring_collectives``)."""

    mixed_precision_param: Literal["float32", "bfloat16"] = "bfloat16"
    """FSDP2 parameter dtype during compute on GPU."""

    mixed_precision_reduce: Literal["float32", "bfloat16"] = "float32"
    """FSDP2 gradient reduction dtype."""

    init_timeout_s: int = 1800
    """Collective timeout in seconds outside the training loop: the first rendezvous, ranks waiting
    while another loads the LLM or fills the first buffer, checkpoint saves and loads, the end of
    run's exports. The process group's own timeout."""

    train_timeout_s: int = 300
    """Collective timeout in seconds inside the training loop. On gloo the watchdog
    (``tools/watchdog.py``) names the rank that stopped answering and the collective, and exits
    with code 4 (the launcher restarts from the last checkpoint); on NCCL the group's timeout drops
    to it once training starts (the flight recorder dumps on a timeout). A checkpoint save in the
    loop waits past it for ranks that still answer (they are writing), not for one that stopped
    answering (gloo: its heartbeat stood still for ``min(60, train_timeout_s)`` s)."""

    timeout_s: int = 0
    """Deprecated: use ``init_timeout_s`` and ``train_timeout_s``. When set (> 0) it is both, as
    it used to be (with a warning)."""


@dataclass
class Checkpoint:
    enable: bool = True
    """Save distributed checkpoints and resume from the latest complete one."""

    folder: str = "checkpoints"
    """Checkpoint folder inside the run folder."""

    interval: int = 500
    """Save every this many steps (and at the end)."""

    keep_latest_k: int = 3
    """Complete checkpoints to keep (0 keeps all)."""

    async_mode: Literal["disabled", "async"] = "disabled"
    """Write checkpoints in a background thread."""

    signal_lead_s: float = 0.0
    """Seconds between a preemption's signal and the kill (SLURM's ``--signal=B:USR1@N``;
    ``scripts/slurm_train.sh`` passes its ``SIGNAL_LEAD_S``). A save that takes longer is warned
    about: the stop save would be lost. 0: not checked."""

    load_step: int = -1
    """Step to resume from; -1 takes the latest complete checkpoint."""

    fresh_start: bool = False
    """Ignore existing checkpoints and start from step 0."""

    export: bool = True
    """Write the native export (``export/``) at the end of the run."""

    export_circuit_tracer: bool = False
    """Also write a circuit-tracer folder (``circuit_tracer/``) at the end."""

    export_calibration_tokens: int = 4096
    """Rows of the training data, drawn after the last step, that calibrate TopK / BatchTopK
    inference. BatchTopK: its threshold is fitted so that k features fire per token and layer on
    them, for the end-of-run eval, the native export and the feature examples
    (``report/batchtopk_threshold.json``); the circuit-tracer export of a BatchTopK model is that
    same JumpReLU (one model, whichever loader). TopK's circuit-tracer export (JumpReLU): each
    feature's threshold and each layer's L0 are fitted on them (``conversion.json`` reports L0,
    FVU and never-firing features, native vs export). 0: the threshold tracked in training,
    uncalibrated. ``scripts/export.py`` measures the conversion on held-out text for any saved step."""

    export_dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype of exported weights."""

    export_max_file_gb: float = 5.0
    """Largest safetensors file of the native export, in GB (10^9 bytes; the Hugging Face Hub
    refuses files over 50 GB). A model under it is one ``model.safetensors``; a bigger one is
    split between tensors, in the model's order (a CLT's decoder by source layer), into
    ``model-0000i-of-0000N.safetensors`` with ``model.safetensors.index.json`` (transformers'
    layout). A single tensor over the cap gets a file of its own."""


@dataclass
class Metrics:
    log_freq: int = 10
    """Log every this many steps."""

    enable_tensorboard: bool = True
    """Write TensorBoard events under ``tb/``."""

    save_jsonl: bool = True
    """Append one JSON object per logged step to ``metrics.jsonl``."""

    per_layer: bool = True
    """Include per-layer lists (FVU, L0) in the logged metrics."""

    wandb: bool = False
    """Also log to Weights & Biases (rank 0; ``pip install 'torchtitan_clt[wandb]'``): every logged
    scalar, the per-layer lists as one chart per layer, the resolved config, the report's plots at
    the end. The run id is checkpointed, so a resumed or requeued run continues the same WandB run."""

    wandb_project: str = "torchtitan_clt"
    """WandB project."""

    wandb_entity: str = ""
    """WandB entity (user or team); empty: your default entity."""

    wandb_run_name: str = ""
    """WandB run name; empty: ``job.name``."""

    wandb_tags: list[str] = field(default_factory=list)
    """WandB tags, e.g. ``["clt", "sweep-3"]``."""

    wandb_mode: Literal["", "online", "offline", "disabled"] = ""
    """``offline`` writes the run under ``<run folder>/wandb/`` with no network (``wandb sync``
    uploads it later); empty: the ``WANDB_MODE`` environment variable, else online."""

    wandb_log_artifacts: bool = False
    """At the end, log the exports (native, circuit-tracer, SAELens when written) with the report and
    a generated model card as a WandB artifact ``<run name>-model`` (type ``model``)."""


@dataclass
class Profiling:
    enable_profiling: bool = False
    """Record ``torch.profiler`` traces."""

    profile_freq: int = 100
    """Record a window every this many steps."""

    profile_active: int = 3
    """Steps recorded in each window."""

    profile_warmup: int = 1
    """Profiler warm-up steps before each window."""

    save_traces_folder: str = "profile_traces"
    """Trace folder inside the run folder."""

    enable_memory_snapshot: bool = False
    """Dump a CUDA memory snapshot (pickle for pytorch.org/memory_viz) every ``profile_freq`` steps."""

    save_memory_snapshot_folder: str = "memory_snapshot"
    """Memory snapshot folder inside the run folder."""


@dataclass
class Kernels:
    backend: Literal["auto", "torch", "triton"] = "auto"
    """Kernel implementation: Triton where a GPU is present (``auto``), or the torch fallback."""

    sparse_density_threshold: float = 0.05
    """Above this fraction of active features the decoder runs dense."""


@dataclass
class Eval:
    every: int = 0
    """Evaluate the replacement model every this many steps (0: only at the end, if enabled)."""

    enable: bool = False
    """Run the replacement-model evaluation at the end of training."""

    dataset: str = ""
    """Evaluation text: empty (or ``data.dataset``) reads the documents the training stream holds
    out (index % 100 == 99); another dataset is read whole."""

    tokens: int = 16_384
    """Tokens evaluated."""

    batch_size: int = 8
    """Contexts per evaluation forward."""

    open_loop: bool = True
    """Also evaluate each layer replaced alone (open loop; 3 LLM forwards per covered layer and
    batch, the ablation baselines computed once per run)."""

    dense_threshold: float = 0.1
    """Feature statistics: a feature firing on more than this fraction of eval tokens is dense."""

    feature_examples_tokens: int = 0
    """Held-out tokens for the feature examples written at the end (0: none): each feature's top
    contexts, density and promoted tokens, as circuit-tracer's ``features/`` files and a browser
    ``features/index.html``. ``scripts/features.py`` does it for any run or export."""

    feature_examples: int = 8
    """Top contexts kept per feature in the feature examples."""

    feature_skip_positions: int = 4
    """Window positions after BOS that feature examples are not taken from: position 1 sees only
    BOS and itself (an attention sink whose activations show a token, not a feature), 2-4 see one to
    three tokens of context. Density and the maximum still count every position."""


@dataclass
class JobConfig:
    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    loss: Loss = field(default_factory=Loss)
    data: Data = field(default_factory=Data)
    standardize: Standardize = field(default_factory=Standardize)
    training: Training = field(default_factory=Training)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    parallelism: Parallelism = field(default_factory=Parallelism)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    metrics: Metrics = field(default_factory=Metrics)
    profiling: Profiling = field(default_factory=Profiling)
    kernels: Kernels = field(default_factory=Kernels)
    eval: Eval = field(default_factory=Eval)
