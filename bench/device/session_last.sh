# The session's last device call (nvidia-h200; carry .whl = core + attn + quant): issue 14's new LoRA bank (diffusers
# eager baseline, then the full stack with no / one / two rank-64 adapters), then issue 16's quick NVFP4 row against
# ModelOpt after its exporter's q/k/v fusion. Short table last.
source bench/device/setup.sh
mkdir -p $OUT
date -u
timeout 100 python3 bench/lora_bench.py $OUT/issue14-baseline.json full baseline > $OUT/log-14b.txt 2>&1; echo "baseline rc=$?"
timeout 230 python3 bench/lora_bench.py $OUT/issue14-lora.json full none,one,two > $OUT/log-14.txt 2>&1; echo "lora rc=$?"
python3 bench/lora_bench.py --table "$OUT/issue14-*.json" | tee $OUT/issue14-table.md
timeout 120 python3 bench/modelopt_bench.py $OUT/issue16-nvfp4-static-2x4-fused.json nvfp4 static 2 4 > $OUT/log-16.txt 2>&1; echo "nvfp4 rc=$?"
grep -A1 "flux-dist vs modelopt\|after the export" $OUT/log-16.txt | tail -4
