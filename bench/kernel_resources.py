"""Registers, spills and shared memory of every tuned Triton attention configuration, for an H100,
compiled offline: no GPU needed.

    python bench/kernel_resources.py              # every kernel x configuration, head size 64, bf16
    python bench/kernel_resources.py --json r.json

Why: GPU time comes in 15-minute draws; a configuration that does not compile for sm_90, or that
spills registers to local memory, should not wait for one to be found. Triton compiles a kernel for
any target without a device (`triton.compile` with a `GPUTarget`), and its bundled `ptxas` reports
each kernel's registers per thread and spill bytes; its `cuobjdump` gives the SASS, whose main loop
length over the scores one thread handles per iteration is the instruction count per score (the
kernels are bound by instruction issue, not the tensor cores: bench/NOTES.md, stop 15). Spills are
what this guards against: an
autotuner timing a spilling configuration only wastes its compile, but with `ROBERTA_DS_TRITON_ATTN_TUNE=0`
the first one runs. Times still need the GPU (bench/attention_kernels.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TARGET = ("cuda", 90, 32)  # H100: compute capability 9.0, warp size 32

_BWD_ARGS = {"QKV": "*bf16", "DO": "*bf16", "LSE": "*fp32", "DELTA": "*fp32", "ROWH": "*i32", "DQKV": "*bf16"}
_SCALARS = {"qk_scale": "fp32", "sm_scale": "fp32", "drop_thr": "i32", "stride_t": "i32", "stride_dot": "i32",
            "N": "i32", "HD": "i32"}


def kernel_table():
    """name -> (jit function, argument types, extra constexprs, the configurations it is tuned over)."""
    from roberta_ds import triton_attention as ta
    from roberta_ds import triton_attention_kernels as k

    fwd_args = {"QKV": "*bf16", "O": "*bf16", "LSE": "*fp32", "CU": "*i32", "KEY": "*i32", "qk_scale": "fp32",
                "drop_thr": "i32", "drop_scale": "fp32", "stride_t": "i32", "stride_ot": "i32", "N": "i32",
                "HD": "i32"}
    dkdv_args = {**_BWD_ARGS, "DQ32": "*bf16", "CU": "*i32", "KEY": "*i32", **_SCALARS}
    return {
        "fwd": (k.attn_fwd, fwd_args, {}, ta.FWD_CONFIGS),
        "dkdv": (k.attn_bwd_dkdv, dkdv_args, {"FUSED": False}, ta.DKDV_CONFIGS),
        "dq": (k.attn_bwd_dq, {**_BWD_ARGS, "CU": "*i32", "KEY": "*i32", **_SCALARS}, {}, ta.DQ_CONFIGS),
        "fused": (k.attn_bwd_dkdv, {**dkdv_args, "DQ32": "*fp32"}, {"FUSED": True}, ta.FUSED_CONFIGS),
    }


def compile_one(fn, args: dict, constexprs: dict, num_warps: int, num_stages: int) -> dict:
    """Compile for TARGET and run ptxas -v on the PTX -> registers, spill bytes, shared memory."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    signature = {**args, **{name: "constexpr" for name in constexprs}}
    # What a real launch tells the compiler (Triton's "D" specialization): the tensors are 16-byte
    # aligned and the strides and widths multiples of 16 (2304 / 3072, 768 / 1024 at head size 64).
    # Without it the loads come out one element at a time.
    aligned = [n for n, t in args.items() if t.startswith("*") or n.startswith("stride") or n == "HD"]
    src = ASTSource(fn=fn, signature=signature,
                    constexprs={(fn.arg_names.index(n),): v for n, v in constexprs.items()},
                    attrs={(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    kernel = triton.compile(src, target=GPUTarget(*TARGET), options={"num_warps": num_warps,
                                                                     "num_stages": num_stages})
    # The ptxas Triton itself uses for this target (3.9 emits PTX 9.x, which only its CUDA 13 ptxas
    # reads), and the cuobjdump beside it.
    try:
        ptxas = Path(get_ptxas(TARGET[1]).path)
    except TypeError:  # Triton <= 3.5: one ptxas for every target
        ptxas = Path(get_ptxas().path)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(kernel.asm["ptx"])
        cmd = [str(ptxas), "-v", "--gpu-name", "sm_90a", str(ptx), "-o", str(ptx) + ".cubin"]
        report = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([str(ptxas.parent / "cuobjdump"), "-sass", str(ptx) + ".cubin"],
                              capture_output=True, text=True, check=True).stdout
    regs = re.search(r"Used (\d+) registers", report)
    if regs is None:
        raise RuntimeError(f"ptxas -v printed no register count:\n{report}")
    loop = main_loop(sass)
    return {"registers": int(regs.group(1)),
            "spill_bytes": sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", report)),
            # spill traffic where it repeats: local-memory loads and stores in the main loop
            "loop_spill_ops": sum(1 for line in loop if re.search(r"\b(LDL|STL)\b", line)),
            "shared_kib": kernel.metadata.shared / 1024, "wgmma": "wgmma" in kernel.asm["ptx"],
            "loop_instructions": len(loop)}


def main_loop(sass: str) -> list[str]:
    """The instructions of the kernel's longest loop (a branch back to an earlier address) in the
    SASS: the per-block work, which the key/query loop repeats."""
    lines = [(int(m.group(1), 16), line) for line in sass.splitlines()
             if (m := re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+\S", line))]
    lo, hi = 0, -1
    for here, line in lines:
        back = re.search(r"BRA (0x[0-9a-f]+)", line)
        if back and int(back.group(1), 16) < here and here - int(back.group(1), 16) > hi - lo:
            lo, hi = int(back.group(1), 16), here
    return [line for a, line in lines if lo <= a <= hi]


def measure(head_dim: int = 64, dropout: bool = True) -> list[dict]:
    rows = []
    for name, (fn, args, extra, configs) in kernel_table().items():
        for m, n, w, s in configs:
            cx = {"D": head_dim, "BLOCK_M": m, "BLOCK_N": n, "DROPOUT": dropout, **extra}
            row = {"kernel": name, "block_m": m, "block_n": n, "warps": w, "stages": s,
                   **compile_one(fn, args, cx, w, s)}
            # scores one thread handles per iteration: the block's m x n over its 32 x warps threads
            row["instructions_per_score"] = row["loop_instructions"] / (m * n / (32 * w))
            rows.append(row)
            print(f"[resources] {name} {m}x{n} w{w} s{s}: {rows[-1]['registers']} registers", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--no-dropout", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter's (read at import)
    rows = measure(args.head_dim, not args.no_dropout)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(f"\n== Triton attention kernels for sm_90 (head size {args.head_dim}, bf16, dropout "
          f"{'off' if args.no_dropout else 'on'}; compiled offline, ptxas -v)")
    print(f"{'kernel':<6} {'block':>8} {'warps':>5} {'stages':>6} {'regs':>5} {'spill B':>7} {'in loop':>7} "
          f"{'smem KiB':>8} wgmma {'loop instr':>10} {'per score':>9}")
    for r in rows:
        print(f"{r['kernel']:<6} {r['block_m']:>4}x{r['block_n']:<3} {r['warps']:>5} {r['stages']:>6} "
              f"{r['registers']:>5} {r['spill_bytes']:>7} {r['loop_spill_ops']:>7} {r['shared_kib']:>8.1f} "
              f"{'yes' if r['wgmma'] else 'no':>5} {r['loop_instructions']:>10} "
              f"{r['instructions_per_score']:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
