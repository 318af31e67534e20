# One device call (nvidia-h200; carry .whl = core attn + quant's pydantic group + fastapi, starlette, uvicorn,
# python-multipart; and .old = `git archive a9ad7dc flux_dist`, the tree before replica groups):
# 1. issue 14: no LoRA vs one rank-64 adapter on the full stack at 1024x1024, each pass also profiled: the kernels
#    the bank adds, by name;
# 2. issue 15: requests per minute of `serve` on one GPU at 512x512, before replica groups (a9ad7dc) and after
#    (`--replicas 1`), twice each, alternating. Tables last.
source bench/device/setup.sh
mkdir -p $OUT
LORA_PROFILE=1 timeout 230 python3 bench/lora_bench.py $OUT/issue14-profile.json full none,one
timeout 330 python3 bench/serve_bench.py $OUT/issue15-serve.json old=.old "new=.=--replicas 1" old=.old \
  "new=.=--replicas 1"
python3 bench/lora_bench.py --table $OUT/issue14-profile.json
python3 bench/lora_bench.py --diff $OUT/issue14-profile.json none one 30
python3 -c "import json; [print(r) for r in json.load(open('$OUT/issue15-serve.json'))['rows']]"
