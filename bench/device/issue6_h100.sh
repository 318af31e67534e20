# One device call (nvidia-h100-x1): diffusers eager bf16 one pass, then our engine with FLUX.2 [dev] in FP8
# (built block by block) + compile + FA3 FP8 attention + CUDA graphs, 50-step requests, peak memory.
source bench/device/setup.sh
timeout 60 python3 bench/fast_bench.py baseline $OUT/h100_baseline.json
rm -rf /tmp/fdcache1
timeout 120 python3 bench/start_bench.py $OUT/h100_start.json /tmp/fdcache1 fp8attn nocache
