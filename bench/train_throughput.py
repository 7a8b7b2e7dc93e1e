"""Training throughput of roberta-ds on one GPU, measured against Hugging Face side by side.

    python bench/train_throughput.py                        # every case, in priority order; table last
    python bench/train_throughput.py --cases base512_m64 hf_base512_m64 --budget-s 300
    python bench/train_throughput.py --smoke                # CPU: tiny analogues, a few steps (the CI check)
    bash bench/gpu_run.sh                                   # the prepared one-GPU run (see its header)

An `ours` case is the real training path, in-process: `train.setup()` builds the run exactly as
`roberta-ds train` does (DeepSpeed engine from ds_configs/zero2_bf16.json: bf16, ZeRO-2, clipping 1.0;
GuardedAdamW, fused; the model `torch.compile`d before `deepspeed.initialize`), then
`loop.Trainer.train_step()` runs optimizer steps of `accum` micro-batches from our DataLoader over
synthetic shards (Zipf-distributed ids, packed FULL-SENTENCES, dynamic masking), dropout 0.1.
  - throughput: `warmup` steps (compilation included), then `windows` windows of `steps` optimizer
    steps with the device synchronised at the window edges only; the trainer itself reads the host
    once per optimizer step. tokens/s = the median window, counted as the trainer counts them (real,
    non-padding tokens; `fill` = their share of the rows); MFU against 989 TFLOP/s (H100 SXM dense
    bf16 datasheet) with metrics.flops_per_token (head fraction K/T for our masked-only head);
  - phase shares: one more window with `Trainer(timed=True)` (it synchronises per phase, so its own
    rate is printed apart): share of step time outside forward+backward, and the data part of it;
  - recompiles: graphs torch.compile captured after warm-up (must be 0); on a GPU also the CUDA
    synchronisations per optimizer step (torch.cuda.set_sync_debug_mode, one extra step);
  - `parity`: same batches through our compiled bf16 DeepSpeed path and an eager fp32 RobertaMLM
    with the same initial weights and torch AdamW, dropout 0: per-step losses within bf16 tolerance
    and the cosine of the two parameter updates.
Baselines (bench/hf_baseline.py): HF RobertaForMaskedLM (sdpa) under DeepSpeed with the same ds_config
dict and micro batch (`hf_ds`), and compiled without DeepSpeed (`hf_compiled`).

Each case runs in its own process (clean CUDA memory statistics; a crash, OOM or timeout costs one
row) unless --in-process; logs go to --logs, one file per case. Numbers only count on a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for p in (str(REPO), str(REPO / "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)

import numpy as np

MIN_CASE_S = 40.0
"""A case is not started with less budget left than this (an import plus one compile)."""
PARITY_RTOL = 0.01
"""Per-step loss tolerance, relative, bf16 vs fp32: bf16 keeps 8 significant bits (unit roundoff
2^-8 = 0.4%); the loss averages thousands of labelled positions, so rounding mostly cancels (the
CPU smoke run shows 0.02%). The reference loss must fall by more than this for the check to bite."""
PARITY_MIN_COSINE = 0.98
"""Cosine between our parameter update and the fp32 reference's: bf16 noise costs ~1e-3; different
batches, weights or a lost update give < 0.5."""


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
    """bf16: DeepSpeed's bf16 mode (bf16 weights, fp32 master); autocast: DeepSpeed's torch_autocast."""
    zero: int = 2
    overrides: tuple[tuple[str, Any], ...] = ()
    """Extra ModelConfig fields, e.g. (("num_layers", 4),)."""
    goal: float | None = None
    """tokens/s goal on one H100 (the issue's)."""


B, L = "roberta-base", "roberta-large"
CASES: tuple[Case, ...] = (  # GPU priority order: a run cut short by its budget still has the headline
    Case("base512_m64", "ours", B, 512, 64, goal=600e3),
    Case("hf_base512_m64", "hf_ds", B, 512, 64, compile=False),
    Case("hf_base512_m32", "hf_ds", B, 512, 32, compile=False),
    Case("parity", "parity", B, 512, 8, accum=2, overrides=(("num_layers", 4),)),
    Case("base512_m64_autocast", "ours", B, 512, 64, precision="autocast", goal=600e3),
    Case("base512_m128", "ours", B, 512, 128, goal=600e3),
    Case("large512_m32", "ours", L, 512, 32, goal=220e3),
    Case("hf_large512_m32", "hf_ds", L, 512, 32, compile=False),
    Case("large512_m32_ckpt", "ours", L, 512, 32, checkpointing=True, goal=220e3),
    Case("base128_m256", "ours", B, 128, 256),
    Case("hf_base128_m256", "hf_ds", B, 128, 256, compile=False),
    Case("base512_m32", "ours", B, 512, 32, goal=600e3),
    Case("hf_compiled_base512_m64", "hf_compiled", B, 512, 64),
    Case("base512_m64_eager", "ours", B, 512, 64, compile=False, goal=600e3),
    Case("base512_m64_autocast_z1", "ours", B, 512, 64, precision="autocast", zero=1, goal=600e3),
    Case("base512_m8_a1", "ours", B, 512, 8, accum=1),  # a 1024-GPU rank's shape (8K batch): plan's input
)
BY_NAME = {c.name: c for c in CASES}


def smoke_case(c: Case) -> Case:
    """The CPU analogue: tiny model (large -> 4 layers), seq 512 -> 64, micro / 32, accumulation <= 2."""
    layers = (("num_layers", 4),) if c.model == L else ()
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


def steps_for(c: Case, opts: argparse.Namespace) -> int:
    """Optimizer steps per window: --steps, or more so a window holds >= --min-window-tokens positions."""
    return max(opts.steps, math.ceil(opts.min_window_tokens / (c.micro * c.accum * c.seq)))


def model_label(c: Case) -> str:
    short = {"num_layers": "L"}
    extra = "".join(f",{short.get(k, k)}{v}" for k, v in c.overrides)
    return c.model.replace("roberta-", "") + extra + (",ckpt" if c.checkpointing else "")


# ----------------------------------------------------------------------------------------------
# Synthetic data: a tokenizer.json (for the fingerprint) and Zipf-distributed token shards


def write_tokenizer(out: Path, vocab_size: int) -> Path:
    """A WordLevel tokenizer.json, RoBERTa's special ids: <s> 0, <pad> 1, </s> 2, <unk> 3, <mask> last."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    specials = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": vocab_size - 1}
    vocab = {f"w{i}": i for i in range(4, vocab_size - 1)} | specials
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True) for t in specials])
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "tokenizer.json.tmp"
    tok.save(str(tmp))
    os.replace(tmp, out / "tokenizer.json")
    return out


def write_shards(out: Path, tokenizer: Path, tokens: int, shards: int = 2, seed: int = 0) -> Path:
    """~`tokens` ids in `shards` shards: sentences of geometric length (mean 30), ~10 per document,
    ids drawn from a Zipf law (exponent 1.1 over a shuffled vocabulary), so the loss can fall."""
    from roberta_ds.shards import Manifest, ShardWriter, shard_info, token_dtype, write_manifest
    from roberta_ds.tokenizer import load_tokenizer_info

    info = load_tokenizer_info(tokenizer)
    v = info.vocab_size
    rng = np.random.default_rng(seed)
    ordinary = rng.permutation(np.arange(4, v - 1))
    p = 1.0 / np.arange(1, len(ordinary) + 1) ** 1.1
    p /= p.sum()
    out.mkdir(parents=True, exist_ok=True)
    infos = []
    for s in range(shards):
        prefix = out / f"shard-{s:05d}"
        ids = ordinary[rng.choice(len(ordinary), size=tokens // shards, p=p)]
        lengths = np.minimum(rng.geometric(1 / 30, size=tokens // 10 + 10), 400)
        ends = np.cumsum(lengths)
        ends = np.concatenate([ends[ends < len(ids)], [len(ids)]])
        with ShardWriter(prefix, token_dtype(v)) as w:
            for i, sentence in enumerate(np.split(ids, ends[:-1])):
                w.add_sequence(sentence)
                if i % 10 == 9:
                    w.end_document()
        infos.append(shard_info(prefix))
    write_manifest(
        out,
        Manifest(
            tokenizer_sha256=info.sha256,
            vocab_size=v,
            special_ids=info.special_ids,
            dtype=str(token_dtype(v)),
            shards=tuple(infos),
        ),
    )
    return out


def prepare_data(work: Path, vocab_size: int, tokens: int) -> tuple[Path, Path]:
    """(tokenizer dir, train shard set) under `work`, reused when already made with these sizes."""
    tok, train = work / "tokenizer", work / "shards" / "train"
    stamp = work / "data.json"
    want = {"vocab_size": vocab_size, "tokens": tokens, "version": 1}
    if stamp.is_file() and json.loads(stamp.read_text()) == want and (train / "manifest.json").is_file():
        return tok, train
    write_tokenizer(tok, vocab_size)
    write_shards(train, tok, tokens)
    stamp.write_text(json.dumps(want))
    return tok, train


# ----------------------------------------------------------------------------------------------
# Our trainer, driven in-process


def trainer_argv(
    c: Case, tok: Path, train: Path, out: Path, workers: int, extra: list[str] = ()
) -> list[str]:
    """`roberta-ds train` arguments for case `c` (the repo's zero2_bf16.json, resized)."""
    ds = [
        f"train_batch_size={c.micro * c.accum}",
        f"train_micro_batch_size_per_gpu={c.micro}",
        f"zero_optimization.stage={c.zero}",
    ]
    if c.precision == "autocast":
        ds += ["bf16.enabled=false", "torch_autocast.enabled=true", "torch_autocast.dtype=bfloat16"]
    sets = [
        f"model.preset={c.model}",
        f"tokenizer={tok}",
        f"data.train={train}",
        f"data.max_seq_len={c.seq}",
        f"data.num_workers={workers}",
        f"output_dir={out}",
        "tensorboard=false",
        f"compile={str(c.compile).lower()}",
        f"model.activation_checkpointing={str(c.checkpointing).lower()}",
        *(f"model.{k}={v}" for k, v in c.overrides),
        *extra,
    ]
    argv = ["--ds-config", str(REPO / "ds_configs" / "zero2_bf16.json"), "--resume", "none"]
    for s in ds:
        argv += ["--ds-set", s]
    for s in sets:
        argv += ["--set", s]
    return argv


def _free_port_env() -> None:
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")


def start_trainer(c: Case, tok: Path, train: Path, out: Path, workers: int, extra: list[str] = ()):
    """`train.setup()` + `loop.Trainer`, exactly what `roberta-ds train` builds, for one rank."""
    from roberta_ds.faults import Faults
    from roberta_ds.loop import Trainer
    from roberta_ds.signals import StopFlag
    from roberta_ds.train import parse_args, setup

    _free_port_env()
    stop = StopFlag()
    rt = setup(parse_args(trainer_argv(c, tok, train, out, workers, extra)), stop)
    return rt, Trainer(rt, stop, Faults(""), timed=False)


def close_trainer(trainer: Any) -> None:
    trainer.loader.close()  # shuts the DataLoader workers down now
    trainer.sink.close()


def count_syncs(step, device) -> int | None:
    """CUDA synchronisations torch reports during one call of `step` (None on CPU)."""
    import warnings

    import torch

    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize(device)  # after the mode is off: our own sync is not counted
    return sum("synchroniz" in str(w.message) for w in caught)


def profile_step(step, device, path: Path) -> None:
    """torch.profiler over one optimizer step; the top kernels by self device time go to `path`."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        from hf_baseline import sync

        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    try:
        table = prof.key_averages().table(sort_by=key, row_limit=40)
    except Exception:  # noqa: BLE001 - older torch names it self_cuda_time_total
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table)


def run_ours(c: Case, opts: argparse.Namespace, tok: Path, train: Path) -> dict[str, Any]:
    from hf_baseline import dynamo_graphs, measure_windows, peak_memory_gib, rate_summary, sync

    from roberta_ds.loop import StepTimes
    from roberta_ds.metrics import mfu

    rt, trainer = start_trainer(c, tok, train, opts.work / "runs" / c.name, opts.workers)
    dev, plan, steps = rt.device, rt.plan, steps_for(c, opts)
    try:
        t0 = time.perf_counter()
        trainer.train_step()
        sync(dev)
        first_step_s = time.perf_counter() - t0  # compilation happens here
        for _ in range(opts.warmup - 1):
            trainer.train_step()
        sync(dev)
        graphs = dynamo_graphs()
        trainer.loss_sum.zero_()
        # measure_windows brackets each window with a sync; the trainer's Window counts its tokens.
        tokens, samples, seconds = [], [], []
        for _ in range(opts.windows):
            trainer.window.reset()
            seconds += measure_windows(trainer.train_step, dev, windows=1, steps=steps)
            tokens.append(trainer.window.tokens)
            samples.append(trainer.window.samples)
        loss = float(trainer.loss_sum) / (opts.windows * steps * plan.grad_accum)
        row = rate_summary(seconds, tokens, samples)

        trainer.timed, trainer.times = True, StepTimes()
        trainer.window.reset()
        for _ in range(steps):
            trainer.train_step()
        t = trainer.times
        timed_rate = trainer.window.take()["tokens_per_s"]
        trainer.timed = False
        syncs = count_syncs(trainer.train_step, dev)
        if opts.profile and not opts.profiled:
            profile_step(trainer.train_step, dev, opts.profile / f"profile_{c.name}.txt")
        recompiles = dynamo_graphs() - graphs  # over every step after warm-up, timed ones included
        row.update(
            {
                "impl": "ours",
                "compile": c.compile,
                "precision": "ds-" + c.precision,
                "zero": c.zero,
                "flops_per_token": trainer.flops_token,
                "mfu": mfu(row["tokens_per_s"], trainer.flops_token, 1, opts.peak_tflops),
                "peak_gib": peak_memory_gib(dev),
                "first_step_s": first_step_s,
                "recompiles": recompiles,
                "graphs": graphs,
                "loss": loss,
                "loss_finite": math.isfinite(loss),
                "fill": float(np.sum(tokens) / (np.sum(samples) * c.seq)),
                "outside_fb_share": 1 - t.forward_backward / t.total if t.total else None,
                "data_share": t.data / t.total if t.total else None,
                "optimizer_share": t.optimizer / t.total if t.total else None,
                "timed_tokens_per_s": timed_rate,
                "syncs_per_step": syncs,
                "micro_per_step": plan.grad_accum,
                "steps_per_window": steps,
            }
        )
        return row
    finally:
        close_trainer(trainer)


# ----------------------------------------------------------------------------------------------
# Parity: our compiled bf16 DeepSpeed step vs eager fp32 on the same batches


def compare_losses(ours: list[float], ref: list[float], rtol: float = PARITY_RTOL) -> dict[str, Any]:
    """Per-step relative gaps; ok when every one is within rtol (pure, unit-tested)."""
    if len(ours) != len(ref) or not ours:
        raise ValueError(f"need equal non-empty loss lists, got {len(ours)} and {len(ref)}")
    gaps = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(ours, ref)]
    finite = all(math.isfinite(x) for x in ours + ref)
    return {"max_rel_gap": max(gaps), "rtol": rtol, "losses_ok": finite and max(gaps) <= rtol}


def reference_run(rt: Any, steps: int) -> tuple[list[float], dict[str, Any], dict[str, Any]]:
    """Eager fp32 RobertaMLM, same init (seed) and batches, torch AdamW with our schedule, groups and
    clipping, loss / accum per micro-batch (as DeepSpeed scales it). Returns (losses, init, final)."""
    import torch

    from roberta_ds.data import train_loader
    from roberta_ds.model import RobertaMLM
    from roberta_ds.optim import lr_at, param_groups

    cfg, plan, dev = rt.cfg, rt.plan, rt.device
    state = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed)  # as train.setup does right before building the model
    model = RobertaMLM(cfg.model).to(dev).train()
    torch.random.set_rng_state(state)
    init = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.AdamW(
        param_groups(model, cfg.optim.weight_decay),
        lr=lr_at(0, cfg.optim),
        betas=cfg.optim.betas,
        eps=cfg.optim.eps,
        foreach=False,
    )
    clip = float(rt.ds.get("gradient_clipping", 0.0))
    loader = train_loader(
        rt.data,
        dataclasses.replace(cfg.data, num_workers=0),
        rank=0,
        world_size=1,
        micro_batch=plan.micro_batch,
        grad_accum=plan.grad_accum,
        start_step=0,
    )
    losses = []
    try:
        for step in range(steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg.optim)
            total = 0.0
            for _ in range(plan.grad_accum):
                b = next(loader)
                loss = model(*(b[k].to(dev) for k in ("input_ids", "mlm_positions", "mlm_labels")))
                (loss / plan.grad_accum).backward()
                total += float(loss.detach())
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(total / plan.grad_accum)
    finally:
        loader.close()
    return losses, init, {k: v.detach() for k, v in model.named_parameters()}


def update_cosine(init: dict[str, Any], ours: dict[str, Any], ref: dict[str, Any]) -> float:
    """Cosine between (ours - init) and (ref - init) over every parameter."""
    dot = na = nb = 0.0
    for name, p0 in init.items():
        a = ours[name].double().cpu() - p0.double().cpu()
        b = ref[name].double().cpu() - p0.double().cpu()
        dot, na, nb = dot + float((a * b).sum()), na + float((a * a).sum()), nb + float((b * b).sum())
    return dot / math.sqrt(max(na * nb, 1e-300))


def run_parity(c: Case, opts: argparse.Namespace, tok: Path, train: Path) -> dict[str, Any]:
    from deepspeed.utils import safe_get_full_fp32_param
    from hf_baseline import dynamo_graphs

    extra = [
        "model.dropout=0",
        "model.attention_dropout=0",
        "optim.lr=1e-3",
        "optim.warmup_steps=1",
        "optim.total_steps=1000",
    ]
    rt, trainer = start_trainer(c, tok, train, opts.work / "runs" / c.name, opts.workers, extra)
    try:
        ours = []
        graphs = None
        for step in range(opts.parity_steps):
            trainer.train_step()
            ours.append(float(trainer.loss_sum) / rt.plan.grad_accum)  # a sync per step: a check, not timed
            trainer.loss_sum.zero_()
            if step == 0:
                graphs = dynamo_graphs()
        final = {
            n.removeprefix("_orig_mod."): safe_get_full_fp32_param(p).detach().float()
            for n, p in rt.engine.module.named_parameters()
        }
        recompiles = dynamo_graphs() - graphs
    finally:
        close_trainer(trainer)
    ref, init, ref_final = reference_run(rt, opts.parity_steps)
    row = compare_losses(ours, ref)
    cos = update_cosine(init, final, ref_final)
    row.update(
        {
            "impl": "parity",
            "compile": c.compile,
            "precision": "ds-" + c.precision,
            "zero": c.zero,
            "ours_losses": ours,
            "ref_losses": ref,
            "loss_drop": ref[0] - min(ref),
            "update_cosine": cos,
            "min_cosine": PARITY_MIN_COSINE,
            "recompiles": recompiles,
        }
    )
    row["ok"] = bool(row["losses_ok"] and cos >= PARITY_MIN_COSINE and recompiles == 0)
    return row


# ----------------------------------------------------------------------------------------------
# One case, the driver, and the table


def run_case(c: Case, opts: argparse.Namespace) -> dict[str, Any]:
    import torch
    from hf_baseline import run_hf

    from roberta_ds.config import model_config
    from roberta_ds.ds_config import load_ds_config

    tok, train = opts.work / "tokenizer", opts.work / "shards" / "train"
    head = {
        "case": c.name,
        "model": model_label(c),
        "seq": c.seq,
        "micro": c.micro,
        "accum": c.accum,
        "goal": c.goal,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    t0 = time.perf_counter()
    if c.impl == "ours":
        row = run_ours(c, opts, tok, train)
    elif c.impl == "parity":
        row = run_parity(c, opts, tok, train)
    else:
        from roberta_ds.tokenizer import load_tokenizer_info

        cfg = model_config(c.model, vocab_size=load_tokenizer_info(tok).vocab_size, **dict(c.overrides))
        ds = load_ds_config(REPO / "ds_configs" / "zero2_bf16.json", [f"zero_optimization.stage={c.zero}"])
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        row = run_hf(
            cfg,
            seq=c.seq,
            micro=c.micro,
            accum=c.accum,
            mode=c.impl,
            ds=ds,
            compile_model=c.compile,
            warmup=opts.warmup,
            windows=opts.windows,
            steps=steps_for(c, opts),
            device=dev,
            peak_tflops=opts.peak_tflops,
        )
    return {**head, **row, "status": "ok", "case_s": time.perf_counter() - t0}


def _fmt_rate(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x / 1e3:,.1f}K" if x >= 1e4 else f"{x:,.0f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_table(rows: list[dict[str, Any]], gpu: bool) -> str:
    """The final table: one line per case, ratios against HF under DeepSpeed (same model, seq and
    micro batch) and against the best HF row of the same model and seq; goals only on a GPU."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("impl") in ("ours", "hf_ds", "hf_compiled")]

    def hf_same(r: dict[str, Any]) -> float | None:
        for h in ok:
            if h["impl"] == "hf_ds" and (h["model"], h["seq"], h["micro"]) == (
                r["model"],
                r["seq"],
                r["micro"],
            ):
                return h["tokens_per_s"]
        return None

    def hf_best(r: dict[str, Any]) -> float | None:
        base = r["model"].split(",")[0]
        hs = [
            h["tokens_per_s"]
            for h in ok
            if h["impl"].startswith("hf")
            and h is not r
            and h["model"].split(",")[0] == base
            and h["seq"] == r["seq"]
        ]
        return max(hs) if hs else None

    head = (
        f"{'case':<24}{'impl':<12}{'model':<18}{'seq':>5}{'micro':>6}{'acc':>4}{'tokens/s':>10}{'seq/s':>9}"
        f"{'MFU':>7}{'peak GiB':>9}{'out f/b':>8}{'recomp':>7}{'xHF-DS':>8}{'xHFbest':>8}  goal"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.get("impl") == "parity" or r.get("status") != "ok":
            continue
        same, best = hf_same(r), hf_best(r)
        x_same = f"{r['tokens_per_s'] / same:.2f}x" if same and r["impl"] != "hf_ds" else "-"
        x_best = f"{r['tokens_per_s'] / best:.2f}x" if best else "-"
        goal = "-"
        if r.get("goal") and r["impl"] == "ours":
            goal = (
                ("PASS" if r["tokens_per_s"] >= r["goal"] else "miss") + f" >={_fmt_rate(r['goal'])}"
                if gpu
                else "n/a (CPU)"
            )
        peak = "-" if r.get("peak_gib") is None else f"{r['peak_gib']:.1f}"
        lines.append(
            f"{r['case']:<24}{r['impl']:<12}{r['model']:<18}{r['seq']:>5}{r['micro']:>6}{r['accum']:>4}"
            f"{_fmt_rate(r['tokens_per_s']):>10}{r['samples_per_s']:>9,.0f}{_pct(r.get('mfu')):>7}{peak:>9}"
            f"{_pct(r.get('outside_fb_share')):>8}{r.get('recompiles', 0):>7}{x_same:>8}{x_best:>8}  {goal}"
        )
    lines += [
        "",
        (
            "tokens/s: median window; ours counts non-padding tokens (fill below), HF rows have no "
            "padding (seq/s x seq = positions/s, as the anchors count). MFU: model FLOPs/token (ours: "
            "LM head on the K/T masked slots; HF: full logits) / peak."
        ),
        (
            "out f/b: share of an optimizer step outside forward+backward (data + optimizer), from the "
            "timed pass. xHF-DS: vs HF+DeepSpeed, same model/seq/micro; xHFbest: vs the fastest HF row "
            "of that model/seq."
        ),
        "",
    ]
    for r in rows:
        if r.get("status") == "ok" and r.get("impl") == "ours" and "timed_tokens_per_s" in r:
            syncs = "-" if r.get("syncs_per_step") is None else str(r["syncs_per_step"])
            how = f"{r['precision']} ZeRO-{r['zero']} " + (
                f"compiled ({r['graphs']} graph(s))" if r["compile"] else "eager"
            )
            lines.append(
                f"{r['case']:<24}{how}; fill {_pct(r['fill'])}; loss {r['loss']:.3f}; "
                f"first step {r['first_step_s']:.0f} s; data {_pct(r['data_share'])} + optimizer "
                f"{_pct(r['optimizer_share'])} of a step (timed pass "
                f"{_fmt_rate(r['timed_tokens_per_s'])}/s); "
                f"windows {_fmt_rate(r['tokens_per_s_min'])}..{_fmt_rate(r['tokens_per_s_max'])}; "
                f"syncs/step {syncs} ({r['micro_per_step']} micro)"
            )
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"{r['case']:<24}{r.get('status', '?').upper()}: {r.get('error', '')[:300]}")
        elif r.get("impl") == "parity":
            gaps = ", ".join(f"{a:.4f}/{b:.4f}" for a, b in zip(r["ours_losses"], r["ref_losses"]))
            lines.append(
                f"{r['case']:<24}{'OK' if r['ok'] else 'FAILED'}: ours/fp32 loss per step {gaps}; max gap "
                f"{100 * r['max_rel_gap']:.2f}% (tol {100 * r['rtol']:g}%), update cosine "
                f"{r['update_cosine']:.4f} (min {r['min_cosine']}), recompiles {r['recompiles']}"
            )
    return "\n".join(lines)


def child_command(c: Case, opts: argparse.Namespace, result: Path) -> list[str]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--_case",
        c.name,
        "--_result",
        str(result),
        "--work",
        str(opts.work),
        "--warmup",
        str(opts.warmup),
        "--windows",
        str(opts.windows),
        "--steps",
        str(opts.steps),
        "--workers",
        str(opts.workers),
        "--parity-steps",
        str(opts.parity_steps),
        "--min-window-tokens",
        str(opts.min_window_tokens),
    ]
    if opts.peak_tflops:
        cmd += ["--peak-tflops", str(opts.peak_tflops)]
    if opts.smoke:
        cmd.append("--smoke")
    if opts.compile is not None:
        cmd.append("--compile" if opts.compile else "--no-compile")
    if opts.profile and not opts.profiled:
        cmd += ["--profile", str(opts.profile)]
    return cmd


def run_all(cases: list[Case], opts: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    opts.logs.mkdir(parents=True, exist_ok=True)
    for c in cases:
        left = opts.budget_s - (time.perf_counter() - t_start) if opts.budget_s else math.inf
        if left < MIN_CASE_S:
            rows.append(
                {"case": c.name, "status": "skipped", "error": f"budget ({opts.budget_s:.0f} s) spent"}
            )
            print(f"[bench] {c.name}: skipped (budget)", flush=True)
            continue
        t0 = time.perf_counter()
        if opts.in_process:
            try:
                row = run_case(c, opts)
            except Exception as e:  # noqa: BLE001 - one failed case must not lose the others' rows
                traceback.print_exc()
                row = {"case": c.name, "status": "failed", "error": f"{type(e).__name__}: {e}"}
            finally:
                _release()
        else:
            result, log = opts.logs / f"{c.name}.json", opts.logs / f"{c.name}.log"
            result.unlink(missing_ok=True)
            timeout = min(opts.case_timeout_s, left)
            with open(log, "w") as f:
                try:
                    rc = subprocess.run(
                        child_command(c, opts, result),
                        stdout=f,
                        stderr=subprocess.STDOUT,
                        timeout=timeout,
                        cwd=str(REPO),
                        check=False,
                    ).returncode
                except subprocess.TimeoutExpired:
                    rc = "timeout"
            if result.is_file():
                row = json.loads(result.read_text())
            else:
                tail = log.read_text(errors="replace").strip().splitlines()[-12:]
                status = "timeout" if rc == "timeout" else "failed"
                row = {
                    "case": c.name,
                    "status": status,
                    "error": f"rc {rc}; see {log}: " + " | ".join(tail)[-400:],
                }
        if c.impl == "ours" and row.get("status") == "ok":
            opts.profiled = True
        rows.append(row)
        rate = (
            _fmt_rate(row.get("tokens_per_s")) + " tokens/s" if "tokens_per_s" in row else row.get("status")
        )
        print(
            f"[bench] {c.name}: {row.get('status')} in {time.perf_counter() - t0:.0f} s ({rate})", flush=True
        )
    return rows


def _release() -> None:
    import torch

    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # --in-process: each case's peak is its own


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument(
        "--cases", nargs="+", default=None, help=f"case names (default: all): {', '.join(BY_NAME)}"
    )
    p.add_argument(
        "--smoke", action="store_true", help="tiny CPU analogues, a few steps (default without CUDA)"
    )
    p.add_argument(
        "--compile",
        dest="compile",
        action="store_true",
        default=None,
        help="torch.compile every case (default: per case on a GPU, off with --smoke)",
    )
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--in-process", action="store_true", help="run every case in this process")
    p.add_argument(
        "--work",
        type=Path,
        default=Path("/tmp/roberta-ds-bench-train"),
        help="scratch: synthetic tokenizer + shards (reused), run dirs",
    )
    p.add_argument("--logs", type=Path, default=None, help="per-case logs and results (default: WORK/logs)")
    p.add_argument("--json", type=Path, default=None, help="write every row here")
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="torch.profiler table of one step of the first `ours` case, into this directory",
    )
    p.add_argument("--warmup", type=int, default=None, help="optimizer steps before timing (GPU 2, smoke 1)")
    p.add_argument("--windows", type=int, default=None, help="timed windows (GPU 3, smoke 2)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per window (GPU 2, smoke 1)")
    p.add_argument(
        "--min-window-tokens",
        type=int,
        default=None,
        help="more steps per window for small batches (GPU 262144 positions, smoke 0)",
    )
    p.add_argument("--parity-steps", type=int, default=6)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (GPU 4, smoke 0)")
    p.add_argument("--tokens", type=int, default=None, help="synthetic corpus tokens (GPU 4M, smoke 200K)")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="MFU denominator, TFLOP/s (default: 989, H100 SXM dense bf16; none with --smoke)",
    )
    p.add_argument("--budget-s", type=float, default=0.0, help="wall-clock budget for all cases (0: none)")
    p.add_argument("--case-timeout-s", type=float, default=420.0)
    p.add_argument("--_case", help=argparse.SUPPRESS)
    p.add_argument("--_result", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    import torch

    gpu = torch.cuda.is_available()
    a.smoke = a.smoke or not gpu
    for name, g, s in (
        ("warmup", 2, 1),
        ("windows", 3, 2),
        ("steps", 2, 1),
        ("workers", 4, 0),
        ("tokens", 4_000_000, 200_000),
        ("min_window_tokens", 262_144, 0),
    ):
        if getattr(a, name) is None:
            setattr(a, name, s if a.smoke else g)
    if a.peak_tflops is None and not a.smoke:
        a.peak_tflops = 989.0
    a.logs = a.logs or a.work / "logs"
    a.profiled = False
    unknown = [n for n in a.cases or [] if n not in BY_NAME]
    if unknown:
        p.error(f"unknown case(s) {unknown}; known: {', '.join(BY_NAME)}")
    if min(a.warmup, a.windows, a.steps) < 1:
        p.error("--warmup, --windows and --steps must be >= 1")
    return a


def resolve(c: Case, opts: argparse.Namespace) -> Case:
    c = smoke_case(c) if opts.smoke else c
    return dataclasses.replace(c, compile=opts.compile) if opts.compile is not None else c


def main(argv: list[str] | None = None) -> int:
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"  # before deepspeed is imported
    opts = parse_args(argv)
    if opts._case:  # a child: one case, its row to --_result
        row = run_case(resolve(BY_NAME[opts._case], opts), opts)
        opts._result.write_text(json.dumps(row))
        _teardown()
        return 0
    import torch

    gpu = torch.cuda.is_available() and not opts.smoke
    cases = [resolve(BY_NAME[n], opts) for n in (opts.cases or BY_NAME)]
    vocab = 2048 if opts.smoke else 50265
    t = time.perf_counter()
    prepare_data(opts.work, vocab, opts.tokens)
    print(
        f"[bench] synthetic data in {opts.work} ({opts.tokens:,} tokens, vocab {vocab}): "
        f"{time.perf_counter() - t:.1f} s",
        flush=True,
    )
    rows = run_all(cases, opts)
    if opts.json:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps(rows, indent=1))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    peak = f"MFU vs {opts.peak_tflops:g} TFLOP/s" if opts.peak_tflops else "no MFU"
    print(
        f"\n== roberta-ds training throughput, one {device}; median of {opts.windows} windows of "
        f">= {opts.steps} optimizer steps (and >= {opts.min_window_tokens:,} positions) after "
        f"{opts.warmup} warm-up steps; {peak}"
        + ("" if gpu else "; SMOKE RUN: tiny models, numbers do not count")
    )
    print(format_table(rows, gpu), flush=True)
    _teardown()
    failed = [r["case"] for r in rows if r.get("status") in ("failed", "timeout")]
    bad_parity = [
        r["case"] for r in rows if r.get("impl") == "parity" and r.get("status") == "ok" and not r["ok"]
    ]
    return 1 if failed or bad_parity else 0


def _teardown() -> None:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
