"""The case table of bench/train_throughput.py: what each case trains, and its CPU (--smoke) analogue.

A case names one measurement: our real training path (`ours`), the bf16-vs-fp32 check (`parity`), or a
Hugging Face baseline (`hf_ds`, `hf_compiled`; bench/hf_baseline.py), with its model preset, sequence
length, micro batch, accumulation, precision and ZeRO stage. CASES is in GPU priority order: a run cut
short by its budget still has the headline rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Case:
    name: str
    impl: str
    """ours | parity | hf_ds | hf_compiled"""
    model: str
    """Preset: roberta-base | roberta-large (tiny analogues with --smoke)."""
    seq: int
    micro: int
    accum: int = 8
    checkpointing: bool = False
    compile: bool = True
    precision: str = "bf16"
    """bf16: DeepSpeed's bf16 mode (bf16 weights, fp32 master); autocast: DeepSpeed's torch_autocast;
    fp16: the shipped ds_configs/zero{stage}_fp16.json (dynamic loss scaling)."""
    zero: int = 2
    ds_sets: tuple[str, ...] = ()
    """Extra DeepSpeed overrides (`--ds-set` syntax) for `ours` and `hf_ds`, e.g. overlap_comm off."""
    overrides: tuple[tuple[str, Any], ...] = ()
    """Extra ModelConfig fields, e.g. (("num_layers", 4),)."""
    sets: tuple[str, ...] = ()
    """Extra training-config overrides (`--set` syntax) for `ours`, e.g. inductor compile options."""
    goal: float | None = None
    """tokens/s goal on one H100 (the issue's; `goal_on` gives an H200's)."""


B, L = "roberta-base", "roberta-large"
SDPA = (("attention_kernel", "sdpa"), ("unpad", False))
"""What a case without an attention override trains: the key-masked SDPA kernel and padded layers (the
model's default before "auto" made varlen + padding-free layers the GPU default), so a row keeps its
meaning across runs; `UNPAD` is what "auto" picks on a GPU."""
VARLEN = (("attention_kernel", "varlen"),)
UNPAD = (*VARLEN, ("unpad", True))
CDT = ("compile_options.coordinate_descent_tuning=true",)
SPLIT32 = ("compile_options.triton.mix_order_reduction_split_size=32",)
CASES: tuple[Case, ...] = (  # GPU priority order: a run cut short by its budget still has the headline
    Case("base512_m64", "ours", B, 512, 64, goal=600e3),
    Case("hf_base512_m64", "hf_ds", B, 512, 64, compile=False),
    Case("large512_m32", "ours", L, 512, 32, goal=220e3),
    Case("hf_large512_m32", "hf_ds", L, 512, 32, compile=False),
    Case("parity", "parity", B, 512, 8, accum=2, overrides=(("num_layers", 4),)),
    Case("hf_base512_m32", "hf_ds", B, 512, 32, compile=False),
    Case("base512_m32", "ours", B, 512, 32, goal=600e3),
    Case("base512_m128", "ours", B, 512, 128, goal=600e3),
    Case("base128_m256", "ours", B, 128, 256),
    Case("hf_base128_m256", "hf_ds", B, 128, 256, compile=False),
    Case("large512_m32_ckpt", "ours", L, 512, 32, checkpointing=True, goal=220e3),
    Case("base512_m64_autocast", "ours", B, 512, 64, precision="autocast", goal=600e3),
    Case("hf_compiled_base512_m64", "hf_compiled", B, 512, 64),
    Case("base512_m64_eager", "ours", B, 512, 64, compile=False, goal=600e3),
    Case("base512_m64_autocast_z1", "ours", B, 512, 64, precision="autocast", zero=1, goal=600e3),
    Case("base512_m8_a1", "ours", B, 512, 8, accum=1),  # a 1024-GPU rank's shape (8K batch): plan's input
    # Levers after the first H100 run (bench/HISTORY.md): the per-micro-batch ZeRO-2 gradient hooks and
    # bucket copies. ZeRO-1 reduces at the accumulation boundary; without overlap_comm, ZeRO-2 copies
    # into its buckets on the compute stream, with no side-stream synchronisation per bucket.
    Case("base512_m64_z1", "ours", B, 512, 64, zero=1, goal=600e3),
    Case("base512_m64_no_overlap", "ours", B, 512, 64, ds_sets=("zero_optimization.overlap_comm=false",),
         goal=600e3),
    Case("base512_m128_z1", "ours", B, 512, 128, zero=1, goal=600e3),
    Case("large512_m32_z1", "ours", L, 512, 32, zero=1, goal=220e3),
    # ZeRO-2 without contiguous_gradients: 28% fewer DeepSpeed host ops per micro-batch (bench/host_ops.py).
    Case("base512_m64_nocontig", "ours", B, 512, 64, ds_sets=("zero_optimization.contiguous_gradients=false",),
         goal=600e3),
    # Diagnostic, not the recipe: what attention-probability dropout costs the attention kernels (the
    # profile's 24.5%; bench/HISTORY.md "ceiling"). Residual and FFN dropout stay at 0.1.
    Case("base512_m64_attn_nodrop", "ours", B, 512, 64, overrides=(("attention_dropout", 0.0),)),
    # FlashAttention-2's varlen kernel with dropout over each row's real tokens (roberta_ds/model/attention.py)
    # instead of cuDNN's masked kernel: the attention lever of the ceiling arithmetic (bench/HISTORY.md).
    Case("base512_m64_varlen", "ours", B, 512, 64, overrides=VARLEN, goal=600e3),
    Case("base512_m128_z1_varlen", "ours", B, 512, 128, zero=1, overrides=VARLEN, goal=600e3),
    Case("large512_m32_varlen", "ours", L, 512, 32, overrides=VARLEN, goal=220e3),
    Case("base128_m256_varlen", "ours", B, 128, 256, overrides=VARLEN),
    # ... and the layers on real tokens only (model.unpad): no compute on the 6% (seq 512) / 19% (seq 128)
    # of positions that are padding.
    Case("base512_m64_unpad", "ours", B, 512, 64, overrides=UNPAD, goal=600e3),
    Case("base512_m128_z1_unpad", "ours", B, 512, 128, zero=1, overrides=UNPAD, goal=600e3),
    Case("large512_m32_unpad", "ours", L, 512, 32, overrides=UNPAD, goal=220e3),
    Case("large512_m32_z1_unpad", "ours", L, 512, 32, zero=1, overrides=UNPAD, goal=220e3),
    Case("base128_m256_unpad", "ours", B, 128, 256, overrides=UNPAD),
    # Bigger micro-batches, fewer host-bound micro steps per token (m128 was +10.8% over m64).
    Case("base512_m256_z1_unpad", "ours", B, 512, 256, zero=1, overrides=UNPAD, goal=600e3),
    Case("large512_m64_z1_unpad", "ours", L, 512, 64, zero=1, overrides=UNPAD, goal=220e3),
    # The same without bf16.immediate_grad_update: bf16 gradients zeroed and accumulated into at every
    # micro-batch (two kernels per tensor instead of one; roberta_ds/engine/ds_grad_accum.py).
    Case("large512_m64_z1_nohook", "ours", L, 512, 64, zero=1, overrides=UNPAD, goal=220e3,
         ds_sets=("bf16.immediate_grad_update=false",)),
    # Between m128 (560.8K) and m256 (481.2K, one LayerNorm-backward kernel 6x slower per element).
    Case("base512_m192_z1_unpad", "ours", B, 512, 192, zero=1, overrides=UNPAD, goal=600e3),
    Case("large512_m128_z1_unpad", "ours", L, 512, 128, zero=1, overrides=UNPAD, goal=220e3),
    # The fastest setting (varlen attention, padding-free layers, ZeRO-1's hooked accumulation) against
    # the plain eager fp32 model with the key mask.
    Case("parity_z1_unpad", "parity", B, 512, 8, accum=2, zero=1, overrides=(("num_layers", 4), *UNPAD)),
    # Inductor's coordinate-descent tuning of its Triton kernels (the LayerNorm/dropout kernels ran at
    # ~half of HBM bandwidth, one of them 6x slower at m256): the fastest settings with it.
    Case("base512_m128_z1_cdt", "ours", B, 512, 128, zero=1, overrides=UNPAD, goal=600e3, sets=CDT),
    Case("large512_m64_z1_cdt", "ours", L, 512, 64, zero=1, overrides=UNPAD, goal=220e3, sets=CDT),
    # The m192/m256 anomaly (bench/HISTORY.md, stop 14): inductor sizes its fused LayerNorm-backward +
    # weight-gradient kernel ("mix-order reduction") by the token count, 64 rows per program from ~68K
    # tokens on (2 rows per iteration), 32 below; the slow kernel ran only with 64. Pinned to 32:
    Case("base512_m192_z1_split32", "ours", B, 512, 192, zero=1, overrides=UNPAD, goal=600e3, sets=SPLIT32),
    Case("base512_m256_z1_split32", "ours", B, 512, 256, zero=1, overrides=UNPAD, goal=600e3, sets=SPLIT32),
    Case("base512_m192_z1_cdt", "ours", B, 512, 192, zero=1, overrides=UNPAD, goal=600e3, sets=CDT),
    # Hidden-state dropout masks from an integer hash instead of Philox (model.dropout_rng=hash,
    # roberta_ds/model/hash_dropout.py): the fused add + dropout + LayerNorm kernel ran at half of HBM
    # bandwidth. The nodrop case (diagnostic, not the recipe) bounds what any dropout RNG can gain.
    Case("base512_m128_z1_hash", "ours", B, 512, 128, zero=1, overrides=(*UNPAD, ("dropout_rng", "hash")),
         goal=600e3),
    Case("base512_m128_z1_nodrop", "ours", B, 512, 128, zero=1, overrides=(*UNPAD, ("dropout", 0.0))),
    Case("base512_m256_z1_s32_hash", "ours", B, 512, 256, zero=1,
         overrides=(*UNPAD, ("dropout_rng", "hash")), goal=600e3, sets=SPLIT32),
    Case("large512_m64_z1_hash", "ours", L, 512, 64, zero=1, overrides=(*UNPAD, ("dropout_rng", "hash")),
         goal=220e3),
    # Our Triton attention kernel lost to FlashAttention-2 on an H200 (0.90x base, 0.83x large, fwd+bwd
    # with dropout 0.1) and was deleted with its cases (bench/HISTORY.md, stop 17).
    # fp16 with dynamic loss scaling (the shipped ds_configs/zero2_fp16.json): its rate on the card.
    Case("base512_m128_fp16", "ours", B, 512, 128, zero=2, precision="fp16", overrides=UNPAD),
)
BY_NAME = {c.name: c for c in CASES}
H200_GOALS = {600e3: 640e3, 220e3: 235e3}
"""The issue's goals on an H200 (same compute as an H100, 1.4x the memory bandwidth) for each H100 one."""


def goal_on(goal: float | None, device: str) -> float | None:
    """A case's goal on the card that runs it: `Case.goal` is the H100's."""
    return H200_GOALS.get(goal, goal) if goal and "H200" in device else goal


def smoke_case(c: Case) -> Case:
    """The CPU analogue: tiny model (large -> 4 layers), seq 512 -> 64, micro / 32, accumulation <= 2;
    overrides other than the layer count carry over."""
    layers = (("num_layers", 4),) if c.model == L else ()
    layers += tuple(o for o in c.overrides if o[0] != "num_layers")
    micro = max(1, c.micro // 32) * (2 if c.impl == "parity" else 1)
    return dataclasses.replace(
        c,
        model="tiny",
        seq=64 if c.seq >= 512 else 32,
        micro=micro,
        accum=min(c.accum, 2),
        overrides=layers,
        compile=False,
    )


def resolve(c: Case, opts: argparse.Namespace) -> Case:
    """The case as this run measures it: its smoke analogue with --smoke, compile forced by --(no-)compile."""
    c = smoke_case(c) if opts.smoke else c
    c = dataclasses.replace(c, compile=opts.compile) if opts.compile is not None else c
    # Compile options mean nothing to an eager run (and the trainer refuses them there).
    return c if c.compile else dataclasses.replace(c, sets=tuple(s for s in c.sets
                                                                  if not s.startswith("compile_options.")))


def steps_for(c: Case, opts: argparse.Namespace) -> int:
    """Optimizer steps per window: --steps, or more so a window holds >= --min-window-tokens positions."""
    return max(opts.steps, math.ceil(opts.min_window_tokens / (c.micro * c.accum * c.seq)))


def model_fields(c: Case) -> dict[str, Any]:
    """The ModelConfig fields a case sets on its preset: `SDPA`, then its own overrides."""
    return {**dict(SDPA), **dict(c.overrides)}


def options_of(c: Case) -> frozenset:
    """The model options a case adds to its preset (attention kernel, unpad, dropout), not its size."""
    return frozenset(o for o in c.overrides if o[0] != "num_layers")


def blocked_by(c: Case, broken: list[Case]) -> Case | None:
    """A case that already failed with every model option `c` uses, if any: `c` would fail the same way
    (an option broken on this card or torch), so the budget goes to the other cases instead."""
    return next((b for b in broken if options_of(b) and options_of(b) <= options_of(c)), None)


def preset_of(c: Case) -> str:
    """The model size a case trains (its preset and layer count), whatever its other options: one
    profile per size (base's and large's breakdowns differ; with --smoke, "tiny" and "tiny,L4")."""
    layers = dict(c.overrides).get("num_layers")
    return c.model + (f",L{layers}" if layers else "")


def model_label(c: Case) -> str:
    """The table's model column: preset without "roberta-", overrides (num_layers -> L) and ",ckpt"."""
    short = {"num_layers": "L", "attention_dropout": "attn-drop", "attention_kernel": "", "unpad": "",
             "dropout_rng": "drop-"}
    extra = "".join(f",{short.get(k, k)}{'unpad' if k == 'unpad' else v}" for k, v in c.overrides)
    return c.model.replace("roberta-", "") + extra + (",ckpt" if c.checkpointing else "")
