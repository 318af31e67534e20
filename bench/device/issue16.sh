# One device call (nvidia-h200, carry .whl from `bash bench/device/wheels.sh core quant`): issue 16, most important
# first. flux-dist against NVIDIA ModelOpt itself at [dev]'s width (random bf16 weights, 1024x1024 pass): ModelOpt's
# own calibration + exporter, then flux-dist loads the export. NVFP4 static: flux-dist's NVFP4 emulation vs ModelOpt's
# NVFP4 fake quantization (CUDA only); FP8 static / dynamic: flux-dist's real FP8 GEMM (_scaled_mm) vs ModelOpt's FP8
# fake quantization. 2 double + 4 single blocks first (quick), then the whole [dev] transformer (8 + 48, 64 GB bf16).
source bench/device/setup.sh
mkdir -p $OUT
timeout 150 python3 bench/modelopt_bench.py $OUT/issue16-nvfp4-static-2x4.json nvfp4 static 2 4
timeout 120 python3 bench/modelopt_bench.py $OUT/issue16-fp8-static-2x4.json fp8 static 2 4
timeout 120 python3 bench/modelopt_bench.py $OUT/issue16-fp8-dynamic-2x4.json fp8 dynamic 2 4
timeout 200 python3 bench/modelopt_bench.py $OUT/issue16-nvfp4-static-dev.json nvfp4 static 8 48
