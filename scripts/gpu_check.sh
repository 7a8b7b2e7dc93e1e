#!/usr/bin/env bash
# The trainer's checks on one CUDA GPU (tests/test_train_cuda.py: resume in bf16 and in fp16 with loss
# scaling, ZeRO-2; the quickstart; tests/test_attention_cuda.py: the varlen attention kernel; the hash
# dropout's Triton code), for a machine whose image has torch, transformers and pytest but no
# DeepSpeed: the wheels travel in .whl/ (bash scripts/gpu_wheels.sh on a machine with PyPI, once).
# One device call, carry [".whl"], timeout_s 420:   bash scripts/gpu_check.sh
# Writes $OUT/gpu_check.log when OUT is set.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || {
  echo "no wheels in .whl/: run 'bash scripts/gpu_wheels.sh' on a machine with PyPI, then carry .whl/"; exit 1; }
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
log=${OUT:-/tmp}/gpu_check.log
# The attention tests first: varlen/unpad (the GPU default).
tests=(tests/test_attention_cuda.py tests/test_train_cuda.py
       tests/test_hash_dropout.py::test_triton_hash_matches_the_cpu_hash_and_the_key_is_drawn_on_the_gpu)
timeout "${CHECK_S:-400}" python3 -m pytest -v -rs -p no:cacheprovider "${tests[@]}" 2>&1 | tee "$log"
exit "${PIPESTATUS[0]}"
