"""`roberta-ds plan`: per-GPU memory, the micro batch that fits, accumulation steps and wall time.

    roberta-ds plan --model roberta-large --gpus 1024 --gpu-mem 80 --batch 8192 --seq 512 --zero 2
    roberta-ds plan --sweep --gpu h100-80gb      # base & large, 500K steps, on 8 / 64 / 1024 GPUs

Everything is a pure function of the flags; nothing is measured here. The memory and time model,
with its sources, is `roberta_ds.plan.model` (re-exported here); this module formats plans and
parses the command line.
"""

from __future__ import annotations

import argparse
import dataclasses

from roberta_ds.config import PRESETS, model_config
from roberta_ds.errors import ConfigError
from roberta_ds.plan.model import (  # noqa: F401 - the model's names are part of this module's API
    ADAM_K,
    CHECKPOINT_SLOWDOWN,
    DEFAULT_LOGITS_FRACTION,
    GPUS,
    H100_PEAK,
    PAPER_BATCH,
    PAPER_GPUS,
    PAPER_HOURS,
    PAPER_SEQ,
    PAPER_STEPS,
    PARAM_BYTES,
    GiB,
    GpuSpec,
    Plan,
    PlanInputs,
    Variant,
    accumulation_steps,
    activation_bytes_per_layer,
    activation_bytes_per_sequence,
    comm_buffer_bytes,
    comm_bytes_per_step,
    default_tokens_per_sec,
    flops_per_token,
    layer_param_count,
    make_plan,
    model_state_bytes,
    param_count,
    stage3_working_bytes,
)

# ---------------------------------------------------------------------------------------------------
# Output


def _gib(x: float) -> str:
    return f"{x:.2f}" if x >= 10 else f"{x:.3f}"


def _hours(h: float | None) -> str:
    if h is None:
        return "-"
    return f"{h:.1f} h ({h / 24:.2f} days)" if h >= 24 else f"{h:.1f} h"


def format_plan(plan: Plan) -> str:
    i, cfg = plan.inputs, plan.cfg
    no, yes = both = plan.variants
    flops = flops_per_token(cfg, i.seq, i.logits_fraction)
    one_node = i.gpus <= (i.gpus_per_node or i.spec.gpus_per_node)
    where = "NVLink within one node" if one_node else "across nodes"
    overlap = f"on, {i.overlap:.0%} of gradient reduction hidden" if i.overlap_comm else "off"
    if i.overlap_comm and i.zero == 1:
        overlap = "on, but ZeRO-1 reduces after the last backward: nothing hidden"
    lines = [
        (f"roberta-ds plan: {i.model} ({plan.params / 1e6:.1f}M params), {i.gpus} x {i.gpu} "
        f"({plan.gpu_mem_gib:g} GiB), ZeRO-{i.zero}, batch {i.batch} x {i.seq} tokens, {i.steps:,} steps"),
        "",
        "per-GPU memory (GiB)                  no checkpointing   full checkpointing",
    ]

    def row(name: str, a: str, b: str | None = None) -> None:
        lines.append(f"  {name:<36}{a:>16}   {b if b is not None else a:>18}")

    for name, gib in plan.states_gib.items():
        row(name, _gib(gib))
    row("communication buckets", _gib(plan.buffers_gib))
    if i.zero == 3:
        row("gathered parameters (ZeRO-3)", _gib(plan.stage3_gib))
    row("activations per sequence", _gib(no.activation_gib_per_seq), _gib(yes.activation_gib_per_seq))
    row(f"usable (-{i.reserve_frac:.0%} - {i.reserve_gib:g} GiB reserve)", _gib(plan.usable_gib))
    row("micro batch (power of 2 that fits)", *(str(v.micro) if v.micro else "does not fit" for v in both))
    row("total at that micro batch", *(_gib(v.total_gib) if v.total_gib else "-" for v in both))
    row("accumulation steps", *(str(v.accumulation) if v.accumulation else "-" for v in both))
    lines += ["", "time"]
    row("tokens/s per GPU", *(f"{v.tokens_per_sec:,.0f}" for v in both))
    row("MFU at that rate", *(f"{v.tokens_per_sec * flops / (i.spec.peak_tflops * 1e12):.0%}" for v in both))
    row("seconds per step", *(f"{v.step_seconds:.3f}" if v.step_seconds else "-" for v in both))
    row("scaling efficiency", *(f"{v.efficiency:.1%}" if v.efficiency else "-" for v in both))
    row(f"time for {i.steps:,} steps", *(_hours(v.hours) for v in both))
    best = plan.best
    lines += [
        "",
        f"recommended: {'full checkpointing' if best and best.checkpointing else 'no checkpointing'}"
        if best else "recommended: nothing fits -- raise --zero, add GPUs, or shorten --seq",
        f"tokens/s per GPU: {plan.tokens_per_sec_source}",
        (f"assumptions: {flops / 1e9:.2f} GFLOP/token; "
        f"{where} at {plan.bandwidth_gbs:g} GB/s bus bandwidth; overlap_comm {overlap}; "
        f"checkpointing costs 1/3 more compute"),
    ]
    return "\n".join(lines)


def paper_check_hours(gpu: str = "v100-32gb", zero: int = 0, tokens_per_sec: float | None = None) -> Plan:
    """The RoBERTa paper's large run (8K x 512, 100K steps, 1024 V100) planned with our model."""
    return make_plan(PlanInputs(model="roberta-large", gpus=PAPER_GPUS, gpu=gpu, batch=PAPER_BATCH,
                                seq=PAPER_SEQ, zero=zero, steps=PAPER_STEPS, tokens_per_sec=tokens_per_sec))


def format_sweep(base: PlanInputs, models: tuple[str, ...] = ("roberta-base", "roberta-large"),
                 gpu_counts: tuple[int, ...] = (8, 64, 1024)) -> str:
    """Time for `base.steps` steps per model and GPU count, plus the paper comparison."""
    lines = [
        (f"roberta-ds plan --sweep: {base.steps:,} steps of {base.batch} x {base.seq} tokens on {base.gpu}, "
        f"ZeRO-{base.zero}"),
        "",
        (f"  {'model':<14}{'GPUs':>6}{'micro':>7}{'accum':>7}{'ckpt':>6}{'tokens/s/GPU':>14}{'scaling':>9}"
        f"{'time':>24}"),
    ]
    sources = set()
    for model in models:
        tps, how = None, None
        if base.tokens_per_sec is not None:
            # A rate given for --model carries over to the other shapes at the same FLOP rate.
            given = flops_per_token(model_config(base.model), base.seq, base.logits_fraction)
            tps = base.tokens_per_sec * given / flops_per_token(model_config(model), base.seq,
                                                                 base.logits_fraction)
            how = "given (--tokens-per-sec)" + ("" if model == base.model else
                                                f" for {base.model}, scaled by FLOPs/token")
        for n in gpu_counts:
            p = make_plan(dataclasses.replace(base, model=model, gpus=n, tokens_per_sec=tps))
            sources.add(f"{model}: {how or p.tokens_per_sec_source}")
            v = p.best
            if v is None:
                lines.append(f"  {model:<14}{n:>6}  does not fit")
                continue
            ckpt = "yes" if v.checkpointing else "no"
            lines.append(f"  {model:<14}{n:>6}{v.micro:>7}{v.accumulation:>7}{ckpt:>6}"
                         f"{v.tokens_per_sec:>14,.0f}{v.efficiency:>9.1%}  {_hours(v.hours):>22}")
    paper = paper_check_hours()
    v = paper.best
    implied = PAPER_STEPS * PAPER_BATCH * PAPER_SEQ / (PAPER_GPUS * PAPER_HOURS * 3600)
    lines += [
        "",
        "tokens/s per GPU:",
        *(f"  {s}" for s in sorted(sources)),
        "",
        ("RoBERTa paper (Liu et al. 2019, sec. 5): roberta-large, 8K x 512, 100K steps, 1024 V100s, "
        "'approximately one day'"),
        (f"  = {implied:,.0f} tokens/s per V100 actually sustained; 500K steps at that rate: "
        f"{5 * PAPER_HOURS / 24:.0f} days (extrapolated; the paper states no 500K wall time)"),
        (f"  this planner, same job on 1024 x v100-32gb (ZeRO-0 like fairseq): "
        f"{_hours(v.hours if v else None)} at {v.tokens_per_sec if v else 0:,.0f} tokens/s per GPU, "
        f"{(v.tokens_per_sec if v else 0) / implied:.1f}x the paper's sustained rate "
        "(2019 fairseq: no flash attention, fewer fused kernels)"),
    ]
    return "\n".join(lines)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a default only where there is one (not for None or store_true flags)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False):
            return action.help or ""
        return super()._get_help_string(action) or ""


def main(argv: list[str]) -> int:
    d = PlanInputs()
    ap = argparse.ArgumentParser(
        prog="roberta-ds plan", description=__doc__.split("\n\n")[0], formatter_class=_HelpFormatter,
        epilog="The memory and time model, with sources: python -m pydoc roberta_ds.plan.model")
    ap.add_argument("--model", default=d.model, help=f"preset: {', '.join(PRESETS)}")
    ap.add_argument("--gpus", type=int, default=d.gpus, help="data-parallel GPUs")
    ap.add_argument("--gpu", default=d.gpu, choices=sorted(GPUS),
                    help="GPU kind (memory, peak, interconnect)")
    ap.add_argument("--gpu-mem", type=float, default=None, help="GiB per GPU (default: the GPU kind's)")
    ap.add_argument("--gpus-per-node", type=int, default=None, help="default: the GPU kind's node (8)")
    ap.add_argument("--batch", type=int, default=d.batch, help="global batch in sequences")
    ap.add_argument("--seq", type=int, default=d.seq, help="tokens per sequence")
    ap.add_argument("--zero", type=int, default=d.zero, choices=(0, 1, 2, 3), help="ZeRO stage")
    ap.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    ap.add_argument("--tokens-per-sec", type=float, default=None,
                    help="measured tokens/s per GPU without checkpointing (default: roberta-ds's own "
                         "measurement for the GPU kind, roberta_ds/plan/measured_rates.py)")
    ap.add_argument("--scaling-efficiency", type=float, default=None,
                    help="override the derived efficiency (compute / step time)")
    ap.add_argument("--intra-gbs", type=float, default=None, help="NVLink bus bandwidth, GB/s")
    ap.add_argument("--inter-gbs", type=float, default=None, help="cross-node bus bandwidth, GB/s")
    ap.add_argument("--no-overlap-comm", action="store_true", help="DeepSpeed overlap_comm off")
    ap.add_argument("--overlap", type=float, default=d.overlap,
                    help="fraction of gradient reduction hidden behind backward with overlap_comm (a guess)")
    ap.add_argument("--bucket-elems", type=float, default=d.bucket_elems,
                    help="DeepSpeed reduce/allgather bucket size in elements (its default is 5e8)")
    ap.add_argument("--grad-bytes", type=int, default=d.grad_bytes, choices=(2, 4),
                    help="bytes per gradient element (4: fp32 grad_accum_dtype)")
    ap.add_argument("--logits-fraction", type=float, default=d.logits_fraction,
                    help="fraction of positions with vocabulary logits (default 78/512: roberta-ds's "
                         "masked-only head at seq 512; 1: a full head like Hugging Face's)")
    ap.add_argument("--reserve-frac", type=float, default=d.reserve_frac,
                    help="memory kept back for fragmentation and workspace")
    ap.add_argument("--reserve-gib", type=float, default=d.reserve_gib,
                    help="plus CUDA context and NCCL, GiB")
    ap.add_argument("--micro", type=int, default=None, help="force this micro batch (power of two)")
    ap.add_argument("--sweep", action="store_true",
                    help="base and large on 8, 64 and 1024 GPUs, with the RoBERTa paper comparison")
    a = ap.parse_args(argv)
    inputs = PlanInputs(
        model=a.model, gpus=a.gpus, gpu=a.gpu, gpu_mem_gib=a.gpu_mem, gpus_per_node=a.gpus_per_node,
        batch=a.batch, seq=a.seq, zero=a.zero, steps=a.steps, tokens_per_sec=a.tokens_per_sec,
        scaling_efficiency=a.scaling_efficiency, intra_gbs=a.intra_gbs, inter_gbs=a.inter_gbs,
        overlap_comm=not a.no_overlap_comm, overlap=a.overlap, bucket_elems=a.bucket_elems,
        grad_bytes=a.grad_bytes, logits_fraction=a.logits_fraction, reserve_frac=a.reserve_frac,
        reserve_gib=a.reserve_gib, micro=a.micro,
    )
    if a.sweep:
        print(format_sweep(inputs))
        return 0
    plan = make_plan(inputs)
    print(format_plan(plan))
    if plan.best is None:
        raise ConfigError(
            f"{inputs.model} does not fit in {plan.gpu_mem_gib:g} GiB per GPU even at micro batch 1 "
            f"(ZeRO-{inputs.zero}, {inputs.gpus} GPU(s)): raise --zero, add --gpus or shorten --seq"
        )
    return 0
