#!/usr/bin/env bash
# The prepared GPU session (bench/gpu_session.py): two device calls on one machine, the second at once.
# Here, once: bash scripts/gpu_wheels.sh   (fills the git-ignored .whl/ with deepspeed and its needs)
#   call 1: carry [".whl"], timeout_s 590:  bash bench/gpu_session.sh 1
#   call 2: carry [".whl"], timeout_s = what is left - 20:  DEADLINE_S=<timeout - 25> bash bench/gpu_session.sh 2
# Under $OUT: session.log (everything), tests.log, results_call<N>.json,
# logs.tgz (one log per case and the torch.profiler tables). The table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
phase=${1:?phase 1 or 2}
OUT=${OUT:-/tmp/rds-session-out}
mkdir -p "$OUT"
if [ -z "${SKIP_WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl \
    || { echo "no wheels: run bash scripts/gpu_wheels.sh here and carry .whl"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0
# Kept on the warm machine between the two calls: inductor's compiled kernels.
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache
date -u +"date %Y-%m-%dT%H:%M:%SZ"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv,noheader || true
python3 -c "import torch, triton, deepspeed, transformers as t; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'triton', triton.__version__, 'deepspeed', deepspeed.__version__, 'transformers', t.__version__)" \
  || exit 1
default=$([ "$phase" = 1 ] && echo 550 || echo 200)
python3 bench/gpu_session.py "$phase" --deadline-s "${DEADLINE_S:-$default}" --out "$OUT" 2>&1 \
  | tee "$OUT/session.log"
rc=${PIPESTATUS[0]}
[ -d "$OUT/logs" ] && tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
exit "$rc"
