# One device call (nvidia-h200; carry .whl from `bash bench/device/wheels.sh core attn`): issue 13 (editing with
# one 1024x1024 reference, full stack vs diffusers eager, 50 steps) and issue 14 (LoRA cost on the full stack).
source bench/device/setup.sh
mkdir -p $OUT
timeout 230 python3 bench/edit_bench.py $OUT/issue13-edit.json 50
timeout 260 python3 bench/lora_bench.py $OUT/issue14-lora.json full none,one,two
