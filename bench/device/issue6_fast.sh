# One device call (nvidia-h200-x2): our stages on 1 GPU and Ulysses 2, diffusers eager in the same call.
source bench/device/setup.sh
timeout 300 python3 bench/fast_bench.py single $OUT/fast_single.json
timeout 280 torchrun --nproc-per-node 2 bench/fast_bench.py sp $OUT/fast_sp.json
