# issue16.sh's two quick rows only (2 double + 4 single blocks at [dev]'s width), for a session's last device minutes.
source bench/device/setup.sh
mkdir -p $OUT
timeout 110 python3 bench/modelopt_bench.py $OUT/issue16-nvfp4-static-2x4.json nvfp4 static 2 4
timeout 80 python3 bench/modelopt_bench.py $OUT/issue16-fp8-static-2x4.json fp8 static 2 4
