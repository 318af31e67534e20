# One device call (nvidia-h200; carry .whl = core attn): the fused SwiGLU + FP8 quantization of the single
# blocks' MLP half (flux_dist/quant/swiglu.py) at 1024x1024 on the full stack:
# 1. the kernel alone at [dev]'s shape against its torch path compiled (agreement and time);
# 2. diffusers eager bf16 (baseline), no LoRA and one rank-64 adapter with the fused path (both profiled);
# 3. no LoRA with the fused path off (the compiled path), in its own process. Tables last.
source bench/device/setup.sh
mkdir -p $OUT
timeout 60 python3 bench/swiglu_check.py | tee $OUT/swiglu-check.md
LORA_PROFILE=1 timeout 230 python3 bench/lora_bench.py $OUT/issue14-fused.json full baseline,none,one
FUSED_SWIGLU_FP8=0 timeout 100 python3 bench/lora_bench.py $OUT/issue14-unfused.json full none
cat $OUT/swiglu-check.md
python3 bench/lora_bench.py --table $OUT/issue14-fused.json
python3 bench/lora_bench.py --table $OUT/issue14-unfused.json
python3 bench/lora_bench.py --diff $OUT/issue14-fused.json none one 12
