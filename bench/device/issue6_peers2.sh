# One device call (nvidia-h200-x2): ours on Ulysses 2 (quick stages), xDiT USP, then cold and warm start of
# the full stack (same inductor cache dir) with 50-step requests.
source bench/device/setup.sh
timeout 150 torchrun --nproc-per-node 2 bench/fast_bench.py sp $OUT/fast_sp.json quick
timeout 110 torchrun --nproc-per-node 2 bench/peers.py xdit $OUT/peers_xdit.json
rm -rf /tmp/fdcache
timeout 160 torchrun --nproc-per-node 2 bench/start_bench.py $OUT/start_cold.json /tmp/fdcache fp8attn
timeout 140 torchrun --nproc-per-node 2 bench/start_bench.py $OUT/start_warm.json /tmp/fdcache fp8attn
