# One device call (nvidia-h200, carry .whl from `bash bench/device/wheels.sh core`): issue 11, most important first.
# [dev] with the real (cut, random-weight) encoder and --quant fp8 at 1024x1024, 28 and 50 steps in one engine under
# an 80 GiB cap; the [dev] encoder whole vs cut (memory, encode time, bit-identity, FP8 error); the pipeline without
# the cap (28 steps); a full-size [klein] 4B transformer saved bf16 and loaded back bf16 -> FP8 block by block.
source bench/device/setup.sh
mkdir -p $OUT
timeout 200 python3 bench/text_encoder_bench.py pipeline $OUT/issue11-dev-cap80.json 80 28,50 every
timeout 150 python3 bench/text_encoder_bench.py encoder $OUT/issue11-encoder.json
timeout 110 python3 bench/text_encoder_bench.py pipeline $OUT/issue11-dev-nocap.json 0 28 every
timeout 110 python3 bench/text_encoder_bench.py load $OUT/issue11-klein-load.json /tmp/klein4b; rm -rf /tmp/klein4b
