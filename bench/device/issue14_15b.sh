# One device call (nvidia-h200; carry .whl = core attn + fastapi, starlette, uvicorn, python-multipart,
# opentelemetry-api, pydantic group; and .old = `git archive a9ad7dc flux_dist`, the tree before replica groups):
# 1. issue 15: requests per minute of `serve` on one GPU at 512x512, before replica groups (a9ad7dc) and after
#    (`--replicas 1`), alternating, twice each;
# 2. issue 14 (+17): no LoRA vs one rank-64 adapter on the full stack at 1024x1024, both passes profiled, after the
#    autotuned SwiGLU-LoRA kernel and the two-stage FP8 attention amax. Tables last.
source bench/device/setup.sh
mkdir -p $OUT
timeout 290 python3 bench/serve_bench.py $OUT/issue15-serve.json old=.old "new=.=--replicas 1" old=.old \
  "new=.=--replicas 1"
LORA_PROFILE=1 timeout 230 python3 bench/lora_bench.py $OUT/issue14-profile2.json full none,one
python3 bench/lora_bench.py --table $OUT/issue14-profile2.json
python3 bench/lora_bench.py --diff $OUT/issue14-profile2.json none one 16
python3 -c "import json; [print(r) for r in json.load(open('$OUT/issue15-serve.json'))['rows']]"
