# One device call (nvidia-h200; carry .whl (core attn + fastapi group) and .cmp = .cmp/old: `git archive a9ad7dc
# flux_dist` (before replica groups), .cmp/new: `git archive 8017935 flux_dist` with the FP8 attention amax as at
# a9ad7dc, so the two trees differ only by the replica groups): issue 15's requests per minute, old then new
# (one pair). Not run yet: the session that wrote it had no device time left.
source bench/device/setup.sh
mkdir -p $OUT
timeout 165 python3 bench/serve_bench.py $OUT/issue15-serve-clean.json old=.cmp/old "new=.cmp/new=--replicas 1"
