# Issue 17: FP8 GEMM shoot-out on one H200 (kind nvidia-h200). One device call, nothing installed:
# the image's torch 2.11 / Triton 3.6. Optional: LAYOUTS=1024x1024/1,1024x1024/2 (default all),
# AUTOTUNE=MxKxN,... (inductor shapes to max-autotune; default all). Results: $OUT/issue17-shootout.json, $OUT/issue17-inductor.json.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit,temperature.gpu --format=csv,noheader
date -u
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
# correctness first, then the GEMM table (all shapes), the activation-quantization kernels, kernel names
timeout ${GEMM_S:-330} python3 bench/gemm/shootout.py --out $OUT/issue17-shootout.json \
  --parts ${PARTS:-check,kernels,gemm,quant} --layouts "${LAYOUTS:-}" 2>&1 | tee $OUT/shootout.log | grep -v "^check {"
# inductor (compile default / max-autotune with persistent TMA templates) in its own process and time limit
timeout ${INDUCTOR_S:-170} python3 bench/gemm/shootout.py --out $OUT/issue17-inductor.json --parts inductor \
  --cfgs-from $OUT/issue17-shootout.json --autotune-shapes "${AUTOTUNE:-}" > $OUT/inductor.log 2>&1
grep -E "^inductor|AUTOTUNE|FAILED|Error" $OUT/inductor.log | head -60
python3 bench/gemm/shootout.py --report $OUT/issue17-inductor.json | tail -8
