# One device call (nvidia-h200; carry .whl from `bash bench/device/wheels.sh core attn`): issue 17's adopted change,
# FP8 fast accumulation, as a whole-pass A/B under the full stack next to diffusers eager bf16.
source bench/device/setup.sh
mkdir -p $OUT
timeout 500 python3 bench/gemm/accum_bench.py $OUT/issue17-accum.json
