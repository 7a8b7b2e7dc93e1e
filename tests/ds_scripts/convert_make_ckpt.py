"""Make real multi-rank DeepSpeed checkpoints of a tiny RobertaMLM for the export tests.

One launch trains a fresh model for 2 steps under each requested DeepSpeed setup and saves it the
way our trainer does: `<out>/<case>/latest`, `<out>/<case>/step2/` with DeepSpeed's files and
(unless the case name ends in `_bare`) `roberta_ds.json` (model config, tokenizer sha256, and the
size and sha256 of every file, as the trainer's manifest has). Rank 0 also writes
`<out>/<case>/reference.safetensors`: the fp32 master weights read from the live engine with
`deepspeed.utils.safe_get_full_fp32_param`, which the consolidated checkpoint must equal exactly.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 tests/ds_scripts/convert_make_ckpt.py \
        --out /tmp/ck --vocab-size 512 --tokenizer-sha256 abc --cases zero2_bf16 zero3_fp32
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import safe_get_full_fp32_param
from safetensors.torch import save_file

from roberta_ds.config import model_config
from roberta_ds.durable import file_sha256
from roberta_ds.model.model import IGNORE_INDEX, RobertaMLM

CASES = {
    # name: (ZeRO stage, precision block)
    "zero0_fp32": (0, {}),
    "zero1_bf16_fp32acc": (1, {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}}),
    "zero2_bf16": (2, {"bf16": {"enabled": True}}),
    "zero2_fp16": (2, {"fp16": {"enabled": True, "initial_scale_power": 8}}),
    "zero3_fp32": (3, {}),
    "zero3_bf16_bare": (3, {"bf16": {"enabled": True}}),
}


def ds_config(stage: int, precision: dict) -> dict:
    zero = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0  # partition even tiny tensors: the real layout
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        **precision,
    }


def allow_fp16_on_this_cpu() -> None:
    """Let DeepSpeed take fp16 on a CPU without native fp16 (no AVX512-FP16/AMX: `torch.ops.mkldnn.
    _is_mkldnn_fp16_supported()` is False, e.g. AMD EPYC without AVX-512), where its sanity check refuses it.

    Torch still computes fp16 there, in its slower reference kernels; what the export tests need is the
    fp16 ZeRO-2 checkpoint's file layout (loss scaler, fp32 master partitions), not native speed. Whether
    the check refuses depends on the CI machine's processor, so the case would otherwise pass on one
    machine and fail on the next."""
    accel = get_accelerator()
    if not accel.is_fp16_supported():
        accel.is_fp16_supported = lambda: True


def run_case(name: str, args: argparse.Namespace) -> None:
    stage, precision = CASES[name]
    if "fp16" in precision:
        allow_fp16_on_this_cpu()
    cfg = model_config("tiny", vocab_size=args.vocab_size, dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    model = RobertaMLM(cfg)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=ds_config(stage, precision))
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(2):
        ids = torch.randint(4, args.vocab_size, (2, 32), generator=g)
        ids[1, 20:] = cfg.pad_id  # padding in every batch
        pos = torch.randint(1, 20, (2, 5), generator=g)
        labels = torch.randint(4, args.vocab_size, (2, 5), generator=g)
        labels[1, 3:] = IGNORE_INDEX
        loss = engine(ids, pos, labels)
        engine.backward(loss)
        engine.step()
    path = os.path.join(args.out, name)
    engine.save_checkpoint(path, tag="step2")
    reference = {}
    for pname, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)  # collective under ZeRO-3: every rank calls it
        reference[pname] = (param.detach() if full is None else full).float().cpu().clone()
    dist.barrier()  # every rank's files are written
    if rank == 0:
        if not name.endswith("_bare"):
            tag_dir = os.path.join(path, "step2")
            files = {}
            for f in sorted(os.listdir(tag_dir)):
                full = os.path.join(tag_dir, f)
                files[f] = {"bytes": os.path.getsize(full), "sha256": file_sha256(full)}
            meta = {"model": dataclasses.asdict(cfg), "tokenizer_sha256": args.tokenizer_sha256,
                    "files": files}
            with open(os.path.join(path, "step2", "roberta_ds.json"), "w") as f:
                json.dump(meta, f)
        save_file(reference, os.path.join(path, "reference.safetensors"))
    dist.barrier()
    engine.destroy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--local_rank", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--tokenizer-sha256", default="")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = p.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    from roberta_ds.engine.runtime import release_shm_buffers

    release_shm_buffers(dist.get_rank())  # DeepSpeed's CPU comm op never unlinks its /dev/shm buffers
    for name in args.cases:
        run_case(name, args)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
