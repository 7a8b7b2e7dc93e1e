"""The planner's default per-GPU training rates: roberta-ds's own measurements, card named.

Each figure is the median tokens/s of `bench/train_throughput.py` for our real training path
(`roberta-ds train`'s DeepSpeed engine: bf16, ZeRO-1 with fused fp32 gradient accumulation,
`torch.compile`, varlen attention with padding-free layers, dropout 0.1 from torch's default RNG,
accumulation 8, seq 512, the masked-only MLM head), on one GPU. `bench/NOTES.md` says how to reproduce
them and `bench/HISTORY.md` holds each run's entry; the raw outputs are under `bench/results/`. Tokens are real (non-padding) tokens: with padding-free
layers a padding position costs nothing, so the planner's batch x seq positions at this rate are
conservative by the fill (94% for FULL-SENTENCES rows at 512).

`roberta_ds.plan.model.default_tokens_per_sec` reads RATES: the measured figure for the GPU kind and
model when there is one, else the H100 figure scaled by FLOPs/token and by the kinds' datasheet peaks
(same MFU: an assumption, said so in the plan's output).
"""

from __future__ import annotations

from dataclasses import dataclass

MEASURED_SEQ = 512
MEASURED_HEAD_SLOTS = 78
"""Masked positions with logits per 512-token row (roberta_ds.data.masking.mask_slots at mask_prob 0.15):
the head's FLOPs in the measured runs, logits fraction 78/512."""


@dataclass(frozen=True)
class MeasuredRate:
    tokens_per_sec: float
    """Real tokens/s on one GPU, median of 3 timed windows."""
    card: str
    """The card as nvidia-smi named it."""
    micro: int
    case: str
    """The bench/train_throughput.py case that measured it."""

    @property
    def source(self) -> str:
        return f"bench/train_throughput.py case {self.case}; how to reproduce it: bench/NOTES.md"

    @property
    def logits_fraction(self) -> float:
        return MEASURED_HEAD_SLOTS / MEASURED_SEQ


RATES: dict[tuple[str, str], MeasuredRate] = {
    # (planner GPU kind, model preset) -> measurement
    ("h100-80gb", "roberta-base"): MeasuredRate(
        557_500.0, "NVIDIA H100 80GB HBM3", 128,
        "base512_m128_z1_unpad"),
    ("h100-80gb", "roberta-large"): MeasuredRate(
        192_400.0, "NVIDIA H100 80GB HBM3", 64,
        "large512_m64_z1_unpad"),
    ("h200-141gb", "roberta-base"): MeasuredRate(
        573_200.0, "NVIDIA H200", 128,
        "base512_m128_z1_unpad"),
    ("h200-141gb", "roberta-large"): MeasuredRate(
        197_000.0, "NVIDIA H200", 64,
        "large512_m64_z1_unpad"),
}
REFERENCE_KIND = "h100-80gb"
"""The kind whose figures are scaled by peak for a kind without a measurement of its own."""
