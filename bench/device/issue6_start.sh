# One device call (nvidia-h200-x2): diffusers' 50-step baseline, then cold and warm start of our full stack on
# Ulysses 2 (its own inductor cache dir, emptied first) with 50-step requests, then the same on 1 GPU (cold).
source bench/device/setup.sh
timeout 100 python3 bench/cache_bench.py baseline $OUT
rm -rf /tmp/fdcache /tmp/fdcache1
timeout 130 torchrun --nproc-per-node 2 bench/start_bench.py $OUT/start_cold.json /tmp/fdcache fp8attn
timeout 100 torchrun --nproc-per-node 2 bench/start_bench.py $OUT/start_warm.json /tmp/fdcache fp8attn
timeout 130 python3 bench/start_bench.py $OUT/start_1gpu_cold.json /tmp/fdcache1 fp8attn
