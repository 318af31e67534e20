# One device call (nvidia-h200): issue 11. The [dev] text encoder at full size (whole vs cut to the 30 layers
# FLUX.2 reads, bit-identity, FP8 error); a full-size [klein] 4B transformer saved bf16 and loaded back
# bf16 -> FP8 block by block; then (once the engine builds the PromptEncoder) the [dev] pipeline with the
# real encoder and --quant fp8 at 1024x1024, 28 and 50 steps, under an 80 GiB cap and without.
source bench/device/setup.sh
mkdir -p $OUT
timeout 300 python3 bench/text_encoder_bench.py encoder $OUT/issue11-encoder.json
timeout 240 python3 bench/text_encoder_bench.py load $OUT/issue11-klein-load.json /tmp/klein4b; rm -rf /tmp/klein4b
for steps in 28 50; do
  timeout 300 python3 bench/text_encoder_bench.py pipeline $OUT/issue11-dev-cap80-$steps.json 80 $steps every
done
timeout 300 python3 bench/text_encoder_bench.py pipeline $OUT/issue11-dev-nocap-28.json 0 28 every
