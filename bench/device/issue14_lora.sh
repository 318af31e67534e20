# One device call (nvidia-h200; carry .whl from `bash bench/device/wheels.sh core attn`): issue 14's LoRA bank, one
# 1024x1024 FLUX.2 [dev] pass. diffusers eager bf16 (baseline); the full stack (FP8 + compile + CUDA graphs) with no
# LoRA, one and two rank-64 adapters on the bank as it is (in place + SwiGLU-fused); the first bank (v1) in its own
# process (a failure of one never loses the other's rows); the table last. JSON: $OUT/issue14-*.json.
source bench/device/setup.sh
mkdir -p $OUT
timeout 110 python3 bench/lora_bench.py $OUT/issue14-baseline.json full baseline
timeout 250 python3 bench/lora_bench.py $OUT/issue14-lora.json full none,one,two
timeout 170 python3 bench/lora_bench.py $OUT/issue14-lora-v1.json full one-v1,two-v1
python3 bench/lora_bench.py --table "$OUT/issue14-*.json" | tee $OUT/issue14-table.md
