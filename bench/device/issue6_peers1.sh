# One device call (nvidia-h200-x2): ours on 1 GPU (quick stages) and the torchao FP8 + compile peer, same GPU kind.
source bench/device/setup.sh
timeout 150 python3 bench/fast_bench.py single $OUT/fast_single.json quick
timeout 420 python3 bench/peers.py single $OUT/peers_single.json
