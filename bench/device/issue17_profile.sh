# One device call (nvidia-h200; carry .whl with core + attn + torchao==0.18.0): issue 17's accounting of one
# FLUX.2 [dev] pass (profile by kernel class) with diffusers eager bf16 and the torchao FP8 peer in the same call.
source bench/device/setup.sh
mkdir -p $OUT
date -u
timeout 580 python3 bench/gemm/profile_pass.py $OUT/issue17-profile.json ${BUDGET_S:-520}
