"""The planner's model (pure): per-GPU memory, the micro batch that fits, accumulation steps, wall time.

`roberta_ds.plan.cli` formats it and is the `roberta-ds plan` command. Everything here is a pure function
of its inputs; nothing is measured. The model, stated once:

Memory per GPU (bytes), mixed precision + Adam, Psi parameters, N data-parallel GPUs, K = 12
(fp32 master weights, momentum, variance), from the ZeRO paper (Rajbhandari et al. 2020, sec. 3-5):
    stage 0: (2 + 2 + K) Psi    stage 1: 2 Psi + 2 Psi + K Psi / N
    stage 2: 2 Psi + (2 + K) Psi / N    stage 3: (2 + 2 + K) Psi / N
(`--grad-bytes 4` for fp32 gradient accumulation.) Stage 3 also holds gathered parameters: two
layers plus the embeddings in 16 bits (DeepSpeed's prefetch window, an estimate).

Activations per sequence (bytes), 16-bit, per encoder layer with s tokens, hidden h, FFN size F,
a heads, following Korthikanti et al. 2022 ("Reducing Activation Recomputation", sec. 4.1), which
for F = 4h is 34 s h + 5 a s^2:
    attention 11 s h (+ 5 a s^2 for softmax, its dropout mask and output), MLP 3 s h + 4 s F,
    two LayerNorm inputs 4 s h.
With flash attention (SDPA) the 5 a s^2 term becomes the fp32 log-sum-exp, 4 a s. A post-LN BERT
layer stores the same tensors as the pre-LN GPT layer of the paper. Embeddings add 3 s h, the MLM head
8 s h + 6 f s V (16-bit logits plus their fp32 log-softmax, f = fraction of positions with logits).
Full checkpointing keeps each layer's input (2 s h per layer) plus one layer's activations.

Fitting: usable = gpu_mem * (1 - reserve_frac) - reserve_gib - communication buckets (DeepSpeed
reduce/allgather buckets, 2 bytes per element; overlap_comm costs 4.5x each, per DeepSpeed's docs).
The micro batch is the largest power of two that divides batch / gpus and fits.

Time: step = compute + exposed communication, compute = batch * seq / (gpus * tokens/s per GPU),
with tokens/s x 3/4 under checkpointing (one more forward: 4 instead of 3 forward-equivalents).
Communication per GPU and step, on rings of N GPUs, in bytes, with B = 2 Psi (the 16-bit
gradients or parameters), as DeepSpeed 0.19 does it with bf16 and fp32 gradient accumulation
(measured with its comms logger on 2 ranks; tests/test_comm_volume.py holds stages 1 and 2, and
stage 3's reduction, to these formulas):
    stage 0: one all-reduce per step, 2 B (N-1)/N (plain data parallel; DeepSpeed refuses bf16 +
             fp32 accumulation without ZeRO, so this is fairseq/DDP's case);
    stage 1: one all-reduce of the accumulated gradients per step, 2 B (N-1)/N, plus the all-gather
             of the updated parameters, B (N-1)/N;
    stage 2: an all-reduce of the whole gradient bucket at EVERY micro step (DeepSpeed's default
             use_multi_rank_bucket_allreduce; each rank keeps its partition), 2 A B (N-1)/N, plus
             the parameter all-gather, B (N-1)/N;
    stage 3: a reduce-scatter per micro step, A B (N-1)/N, and parameter gathers for forward and
             backward, 2 A B (N-1)/N (an upper bound: DeepSpeed keeps small tensors whole).
So with accumulation A ZeRO-2 sends (2A + 1)/3 times ZeRO-1's bytes. Bandwidth: NVLink within a
node, the node's NICs across nodes. With overlap_comm a fraction (`--overlap`, a guess: 0.5) of the
gradient reduction of stages 0, 2 and 3 hides behind backward; stage 1's reduction runs after the
last backward and the all-gather after the optimizer step: neither hides.
Scaling efficiency = compute / step (`--scaling-efficiency` overrides it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from roberta_ds.config import PRESETS, ModelConfig, model_config
from roberta_ds.errors import ConfigError
from roberta_ds.plan.measured_rates import MEASURED_HEAD_SLOTS, MEASURED_SEQ, RATES, REFERENCE_KIND

GiB = 2**30
ADAM_K = 12
"""Bytes of optimizer state per parameter: fp32 master copy + Adam momentum + variance."""
PARAM_BYTES = 2
CHECKPOINT_SLOWDOWN = 3 / 4
"""Throughput factor under full activation checkpointing: 4 forward-equivalents instead of 3."""

# RoBERTa paper (Liu et al. 2019, sec. 5): BERT-large shape, 8K x 512 sequences, 100K steps,
# "We pretrain our model using 1024 V100 GPUs for approximately one day."
PAPER_STEPS, PAPER_BATCH, PAPER_SEQ, PAPER_GPUS, PAPER_HOURS = 100_000, 8192, 512, 1024, 24.0


@dataclass(frozen=True)
class GpuSpec:
    """A GPU kind and the node it usually sits in. Figures are assumptions, not our measurements."""

    name: str
    mem_gib: float
    peak_tflops: float
    """Dense 16-bit tensor-core peak from the datasheet."""
    intra_gbs: float
    """NCCL ring bus bandwidth inside one node (NVLink), GB/s."""
    inter_gbs: float
    """Bus bandwidth across nodes: the node's NICs together (one rail per GPU), GB/s, achieved."""
    gpus_per_node: int = 8


H100_PEAK = 989.0
DEFAULT_LOGITS_FRACTION = MEASURED_HEAD_SLOTS / MEASURED_SEQ
"""roberta-ds's MLM head computes vocabulary logits only at the masked slots: 78 of 512 (15.2%)."""

GPUS: dict[str, GpuSpec] = {
    # DGX-1-class: NVLink2, 4 x 100 Gb/s EDR InfiniBand per 8 GPUs (50 GB/s raw).
    "v100-32gb": GpuSpec("v100-32gb", 32, 125.0, intra_gbs=130, inter_gbs=40),
    # DGX A100: NVLink3, 8 x 200 Gb/s HDR (200 GB/s raw).
    "a100-80gb": GpuSpec("a100-80gb", 80, 312.0, intra_gbs=230, inter_gbs=180),
    # DGX H100: NVLink4 (NCCL ring without NVLS), 8 x 400 Gb/s NDR (400 GB/s raw).
    "h100-80gb": GpuSpec("h100-80gb", 80, 989.0, intra_gbs=360, inter_gbs=350),
    # DGX H200: the H100's compute, NVLink and NICs with 141 GB of HBM3e (nvidia-smi: 143,771 MiB).
    "h200-141gb": GpuSpec("h200-141gb", 140, 989.0, intra_gbs=360, inter_gbs=350),
}


# ---------------------------------------------------------------------------------------------------
# Model arithmetic


def param_count(cfg: ModelConfig) -> int:
    """Parameters of RobertaForMaskedLM with the decoder tied to the word embedding (no pooler)."""
    h, f, v = cfg.hidden_size, cfg.ffn_size, cfg.vocab_size
    embeddings = v * h + cfg.max_positions * h + cfg.type_vocab_size * h + 2 * h
    layer = (4 * h * h + 4 * h) + (2 * h * f + f + h) + 2 * 2 * h   # attention, FFN, two LayerNorms
    head = (h * h + h) + 2 * h + v                                 # dense, LayerNorm, decoder bias
    return embeddings + cfg.num_layers * layer + head


def layer_param_count(cfg: ModelConfig) -> int:
    h, f = cfg.hidden_size, cfg.ffn_size
    return (4 * h * h + 4 * h) + (2 * h * f + f + h) + 4 * h


def flops_per_token(cfg: ModelConfig, seq: int, logits_fraction: float = 1.0) -> float:
    """Training FLOPs per token (3 x forward): 6 P_layers + 12 L s h + 6 (h^2 + h V) f."""
    h, L = cfg.hidden_size, cfg.num_layers
    p_layers = L * (4 * h * h + 2 * h * cfg.ffn_size)
    return 6 * p_layers + 12 * L * seq * h + 6 * (h * h + h * cfg.vocab_size) * logits_fraction


def model_state_bytes(params: int, zero_stage: int, gpus: int, *, grad_bytes: int = 2,
                      k: int = ADAM_K) -> dict[str, float]:
    """Per-GPU bytes of parameters, gradients and optimizer states for a ZeRO stage (ZeRO paper)."""
    if zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"--zero: stage must be 0, 1, 2 or 3, got {zero_stage}")
    if gpus < 1:
        raise ConfigError(f"--gpus: must be >= 1, got {gpus}")
    n = gpus
    p = float(params)
    return {
        "parameters": PARAM_BYTES * p / (n if zero_stage >= 3 else 1),
        "gradients": grad_bytes * p / (n if zero_stage >= 2 else 1),
        "optimizer states": k * p / (n if zero_stage >= 1 else 1),
    }


def activation_bytes_per_layer(cfg: ModelConfig, seq: int, *, flash_attention: bool = True) -> int:
    """Bytes one encoder layer keeps for backward, per sequence (Korthikanti et al. 2022)."""
    s, h, a, f = seq, cfg.hidden_size, cfg.num_heads, cfg.ffn_size
    attention = 11 * s * h + (4 * a * s if flash_attention else 5 * a * s * s)
    mlp = 3 * s * h + 4 * s * f
    layer_norms = 4 * s * h
    return attention + mlp + layer_norms


def activation_bytes_per_sequence(cfg: ModelConfig, seq: int, *, checkpointing: bool,
                                  logits_fraction: float = 1.0, flash_attention: bool = True) -> int:
    """Bytes of activations per sequence in the micro batch (embeddings + layers + MLM head)."""
    s, h = seq, cfg.hidden_size
    layer = activation_bytes_per_layer(cfg, seq, flash_attention=flash_attention)
    embed = 3 * s * h                       # LayerNorm input, dropout mask (bytes), output
    head = 8 * s * h + round(6 * logits_fraction * s * cfg.vocab_size)
    if checkpointing:
        layers = cfg.num_layers * 2 * s * h + layer   # each layer's input + one layer recomputed
    else:
        layers = cfg.num_layers * layer
    return layers + embed + head


def comm_buffer_bytes(zero_stage: int, bucket_elems: float, overlap_comm: bool) -> float:
    """DeepSpeed's reduce (+ allgather) buckets, 16-bit; overlap_comm keeps 4.5x each."""
    buckets = 1 if zero_stage == 0 else 2
    return buckets * bucket_elems * PARAM_BYTES * (4.5 if overlap_comm else 1.0)


def stage3_working_bytes(cfg: ModelConfig, zero_stage: int) -> float:
    """Parameters gathered at once under ZeRO-3: two layers and the embeddings, 16-bit."""
    if zero_stage < 3:
        return 0.0
    embed = (cfg.vocab_size + cfg.max_positions) * cfg.hidden_size
    return PARAM_BYTES * (2 * layer_param_count(cfg) + embed)


def accumulation_steps(batch: int, micro: int, gpus: int) -> int:
    """batch = micro * gpus * accumulation, or a ConfigError showing the arithmetic."""
    if batch % gpus:
        lo, hi = batch // gpus * gpus, (batch // gpus + 1) * gpus
        raise ConfigError(
            f"--batch {batch} does not divide over --gpus {gpus} ({batch} / {gpus} = {batch / gpus:.2f} "
            f"sequences per GPU): use --batch {lo} or {hi}, or a GPU count that divides {batch}"
        )
    per_gpu = batch // gpus
    if per_gpu % micro:
        raise ConfigError(
            f"micro batch {micro} does not divide the {per_gpu} sequences per GPU "
            f"(--batch {batch} / --gpus {gpus}): pick a micro batch that divides {per_gpu}"
        )
    return per_gpu // micro


def comm_bytes_per_step(params: int, zero_stage: int, gpus: int, accumulation: int) -> tuple[float, float]:
    """(gradient-reduction bytes, parameter-gather bytes) each GPU sends per optimizer step (ring)."""
    if gpus == 1:
        return 0.0, 0.0
    ring = (gpus - 1) / gpus
    p2 = PARAM_BYTES * params
    if zero_stage == 0:            # all-reduce once per step
        return 2 * ring * p2, 0.0
    if zero_stage == 1:            # all-reduce once per step, gather the updated partitions
        return 2 * ring * p2, ring * p2
    if zero_stage == 2:            # all-reduce every micro step, gather the updated partitions once
        return 2 * accumulation * ring * p2, ring * p2
    return accumulation * ring * p2, 2 * accumulation * ring * p2   # stage 3: gather fwd + bwd


# ---------------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class PlanInputs:
    model: str = "roberta-base"
    gpus: int = 8
    gpu: str = "h100-80gb"
    gpu_mem_gib: float | None = None
    """Defaults to the GPU kind's memory."""
    gpus_per_node: int | None = None
    batch: int = 8192
    seq: int = 512
    zero: int = 2
    steps: int = 500_000
    tokens_per_sec: float | None = None
    """Per GPU, without checkpointing. Default: our measured figure (roberta_ds.plan.measured_rates)."""
    scaling_efficiency: float | None = None
    intra_gbs: float | None = None
    inter_gbs: float | None = None
    overlap_comm: bool = True
    overlap: float = 0.5
    bucket_elems: float = 2e8
    grad_bytes: int = 2
    logits_fraction: float = DEFAULT_LOGITS_FRACTION
    """Share of positions with vocabulary logits (1.0 for a full head like Hugging Face's)."""
    reserve_frac: float = 0.10
    reserve_gib: float = 1.0
    micro: int | None = None

    def __post_init__(self) -> None:
        if self.gpu not in GPUS:
            raise ConfigError(f"--gpu: unknown GPU kind {self.gpu!r}; choose one of {sorted(GPUS)}")
        for name in ("gpus", "batch", "seq", "steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name}: must be >= 1, got {getattr(self, name)}")
        if self.zero not in (0, 1, 2, 3):
            raise ConfigError(f"--zero: stage must be 0, 1, 2 or 3, got {self.zero}")
        if self.tokens_per_sec is not None and self.tokens_per_sec <= 0:
            raise ConfigError(f"--tokens-per-sec: must be > 0, got {self.tokens_per_sec}")
        if self.scaling_efficiency is not None and not 0 < self.scaling_efficiency <= 1:
            raise ConfigError(f"--scaling-efficiency: must be in (0, 1], got {self.scaling_efficiency}")
        if not 0 <= self.overlap <= 1:
            raise ConfigError(f"--overlap: must be in [0, 1], got {self.overlap}")
        if not 0 < self.logits_fraction <= 1:
            raise ConfigError(f"--logits-fraction: must be in (0, 1], got {self.logits_fraction}")
        if not 0 <= self.reserve_frac < 1:
            raise ConfigError(f"--reserve-frac: must be in [0, 1), got {self.reserve_frac}")
        if self.grad_bytes not in (2, 4):
            raise ConfigError(f"--grad-bytes: 2 (16-bit) or 4 (fp32 accumulation), got {self.grad_bytes}")
        if self.micro is not None and (self.micro < 1 or self.micro & (self.micro - 1)):
            raise ConfigError(f"--micro: must be a power of two, got {self.micro}")

    @property
    def spec(self) -> GpuSpec:
        return GPUS[self.gpu]


@dataclass(frozen=True)
class Variant:
    """One column of the plan: with or without activation checkpointing."""

    checkpointing: bool
    activation_gib_per_seq: float
    micro: int | None
    """None: not even one sequence fits."""
    accumulation: int | None
    total_gib: float | None
    tokens_per_sec: float
    step_seconds: float | None
    compute_seconds: float | None
    efficiency: float | None
    hours: float | None


@dataclass(frozen=True)
class Plan:
    inputs: PlanInputs
    cfg: ModelConfig
    params: int
    gpu_mem_gib: float
    usable_gib: float
    states_gib: dict[str, float]
    buffers_gib: float
    stage3_gib: float
    tokens_per_sec_source: str
    bandwidth_gbs: float
    variants: tuple[Variant, Variant]

    @property
    def best(self) -> Variant | None:
        """The faster variant that fits (no checkpointing when both fit)."""
        fits = [v for v in self.variants if v.micro is not None]
        return min(fits, key=lambda v: v.hours or math.inf) if fits else None


def default_tokens_per_sec(model: str, cfg: ModelConfig, seq: int, gpu: GpuSpec,
                           logits_fraction: float = DEFAULT_LOGITS_FRACTION) -> tuple[float, str]:
    """(tokens/s per GPU, where the figure comes from): our measurement on that GPU kind and model
    (roberta_ds.plan.measured_rates), else the nearest one scaled by FLOPs/token and by datasheet peak."""
    anchor = model if (REFERENCE_KIND, model) in RATES else "roberta-base"
    kind = gpu.name if (gpu.name, anchor) in RATES else REFERENCE_KIND
    m = RATES[(kind, anchor)]
    # Same achieved FLOP rate: scale by FLOPs/token of the measured shape vs ours.
    measured_flops = flops_per_token(PRESETS[anchor], MEASURED_SEQ, m.logits_fraction)
    flops = flops_per_token(cfg, seq, logits_fraction)
    tps = m.tokens_per_sec * measured_flops / flops
    how = (f"measured by roberta-ds: {anchor} on one {m.card}, {m.tokens_per_sec / 1e3:.1f}K tokens/s "
           f"at micro {m.micro} ({m.source})")
    if abs(measured_flops / flops - 1) > 0.005:
        how += ", scaled by FLOPs/token"
    peak = GPUS[kind].peak_tflops
    if kind != gpu.name:
        tps *= gpu.peak_tflops / peak
        how += f", x {gpu.peak_tflops:g}/{peak:g} peak TFLOP/s (not measured on {gpu.name}: same MFU assumed)"
    return tps, how


def make_plan(inputs: PlanInputs) -> Plan:
    """The whole plan for one configuration (pure)."""
    cfg = model_config(inputs.model)
    if inputs.seq > cfg.max_seq_len:
        raise ConfigError(f"--seq {inputs.seq} exceeds {inputs.model}'s {cfg.max_seq_len} positions")
    spec = inputs.spec
    params = param_count(cfg)
    mem = inputs.gpu_mem_gib if inputs.gpu_mem_gib is not None else spec.mem_gib
    per_node = inputs.gpus_per_node or spec.gpus_per_node
    states = {k: v / GiB for k, v in model_state_bytes(params, inputs.zero, inputs.gpus,
                                                       grad_bytes=inputs.grad_bytes).items()}
    buffers = 0.0
    if inputs.gpus > 1:
        buffers = comm_buffer_bytes(inputs.zero, inputs.bucket_elems, inputs.overlap_comm) / GiB
    stage3 = stage3_working_bytes(cfg, inputs.zero) / GiB
    usable = mem * (1 - inputs.reserve_frac) - inputs.reserve_gib
    static = sum(states.values()) + buffers + stage3
    if inputs.tokens_per_sec is not None:
        tps, tps_source = inputs.tokens_per_sec, "given (--tokens-per-sec)"
    else:
        tps, tps_source = default_tokens_per_sec(inputs.model, cfg, inputs.seq, spec, inputs.logits_fraction)
    if inputs.gpus <= per_node:
        bw = inputs.intra_gbs or spec.intra_gbs
    else:
        bw = inputs.inter_gbs or spec.inter_gbs
    accumulation_steps(inputs.batch, 1, inputs.gpus)   # refuse a batch that does not divide, first
    per_gpu = inputs.batch // inputs.gpus

    variants = []
    for ckpt in (False, True):
        act = activation_bytes_per_sequence(cfg, inputs.seq, checkpointing=ckpt,
                                            logits_fraction=inputs.logits_fraction) / GiB
        candidates = [inputs.micro] if inputs.micro else [2**i for i in range(per_gpu.bit_length())]
        fitting = [m for m in candidates if per_gpu % m == 0 and static + m * act <= usable]
        micro = max(fitting) if fitting else None
        v_tps = tps * (CHECKPOINT_SLOWDOWN if ckpt else 1.0)
        if micro is None:
            variants.append(Variant(ckpt, act, None, None, None, v_tps, None, None, None, None))
            continue
        accum = accumulation_steps(inputs.batch, micro, inputs.gpus)
        compute = inputs.batch * inputs.seq / (inputs.gpus * v_tps)
        reduce_b, gather_b = comm_bytes_per_step(params, inputs.zero, inputs.gpus, accum)
        hidden = inputs.overlap if inputs.overlap_comm and inputs.zero != 1 else 0.0
        if inputs.zero == 3:
            exposed = (reduce_b + gather_b) * (1 - hidden) / (bw * 1e9)
        else:
            exposed = (reduce_b * (1 - hidden) + gather_b) / (bw * 1e9)
        eff = compute / (compute + exposed)
        if inputs.scaling_efficiency is not None:
            eff = inputs.scaling_efficiency
        step = compute / eff
        variants.append(Variant(ckpt, act, micro, accum, static + micro * act, v_tps, step, compute, eff,
                                inputs.steps * step / 3600))
    return Plan(inputs, cfg, params, mem, usable, states, buffers, stage3, tps_source, bw,
                (variants[0], variants[1]))
