#!/usr/bin/env bash
# The prepared one-GPU run of bench/train_throughput.py: every case and its Hugging Face baseline in
# one call, on one card, compile warm-ups inside, the final table printed last.
#
# On the workstation, once (fills the git-ignored .whl/ with deepspeed 0.19.8, hjson, pydantic; ~5 MB):
#     bash scripts/gpu_wheels.sh
# Then ONE device call (the session's `run` tool), carry [".whl"], timeout_s 600:
#     bash bench/gpu_run.sh
# Only if device time is left and the machine is still warm (compiled kernels cached in
# TORCHINDUCTOR_CACHE_DIR), the cases the budget skipped, WITH their baseline again (ratios are
# only computed inside one call):
#     bash bench/gpu_run.sh --cases hf_base512_m64 <the skipped cases...>
# CPU check of this script (tiny models): SKIP_WHEELS=1 OUT=/tmp/o bash bench/gpu_run.sh --smoke --cases ...
#
# First bench/model_check.py (CHECK_S, default 100 s; SKIP_CHECK=1 skips it); then the cases.
# Comes back under $OUT: model_check.{log,json}, table.txt (the final table), results.json (every row), run.log,
# logs/<case>.log (one per case process), profile_<case>.txt (torch.profiler, one optimizer step of the first
# case of each model size: base and large).
# BUDGET_S (default 430 s) bounds the case sequence: a case is not started with < 40 s left, a case
# still running at the end is killed (its row says timeout), and the table is printed either way.
# A case that fails other than for memory skips the later cases using all of its model options (a
# varlen kernel broken on this card costs one case, not six).
# On an H200 the device line and the table header say so; the baselines ran on the same card.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/roberta-ds-gpu-out}
mkdir -p "$OUT"
# SKIP_WHEELS=1: deepspeed is installed already (a CPU check of this script)
if [ -z "${SKIP_WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl \
    || { echo "no wheels: run bash scripts/gpu_wheels.sh here and carry .whl"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# DeepSpeed's JIT builds misparse the arch "9.0a" (bench/NOTES.md); none is expected, to be safe.
export TORCH_CUDA_ARCH_LIST=9.0
# A second call on the same warm machine reuses the compiled kernels.
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache
date -u +"date %Y-%m-%dT%H:%M:%SZ"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv,noheader \
  || echo "no nvidia-smi"
python3 -c "import torch, deepspeed, transformers as t; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'deepspeed', deepspeed.__version__, 'transformers', t.__version__)" || exit 1
# The model check (issue 3: SDPA kernel in training, masked-only vs full head, fwd+bwd vs HF), bounded.
SMOKE=""; for a in "$@"; do [ "$a" = "--smoke" ] && SMOKE=--smoke; done
[ -n "${SKIP_CHECK:-}" ] || timeout "${CHECK_S:-100}" python3 bench/model_check.py $SMOKE \
  --json "$OUT/model_check.json" 2>&1 | tee "$OUT/model_check.log" | grep -v '^USDT\|^STAGE:'
python3 bench/train_throughput.py --budget-s "${BUDGET_S:-430}" --work /tmp/roberta-ds-bench \
  --logs "$OUT/logs" --json "$OUT/results.json" --profile "$OUT" "$@" 2>&1 | tee "$OUT/run.log"
rc=${PIPESTATUS[0]}
# KERNELS=1: the Triton sources inductor generated (to read a slow kernel's config offline). Off by
# default: $OUT brings back 8 files at most, and this one would take the slot of a profile or the table.
if [ -n "${KERNELS:-}" ] && [ -d "$TORCHINDUCTOR_CACHE_DIR" ]; then
  (cd "$TORCHINDUCTOR_CACHE_DIR" && find . -name '*.py' -print0 | tar czf "$OUT/kernels.tgz" --null -T -)
  [ "$(stat -c %s "$OUT/kernels.tgz")" -lt 16000000 ] \
    || { echo "kernels.tgz over 16 MB: dropped"; rm -f "$OUT/kernels.tgz"; }
fi
sed -n '/^== roberta-ds training throughput/,$p' "$OUT/run.log" > "$OUT/table.txt"
exit "$rc"
