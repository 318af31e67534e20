"""Generate one image on a Ray cluster: `flux-dist ray-generate` as a script for `ray job submit`.

    ray job submit --working-dir . -- python launch/ray_generate.py --config configs/dev-8gpu.yaml \
        --model /models/FLUX.2-dev --output /shared/out/flux.png

Inside a Ray job RAY_ADDRESS is set, so this connects to that cluster; run directly it starts a
local one. Arguments are those of `flux-dist generate` plus --address, --num-cpus, --timeout.
The image and metrics are written where this driver runs (use a shared or absolute path).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    # `python launch/ray_generate.py` puts launch/ first on sys.path; the package is one level up
    # (the uploaded --working-dir, which Ray also puts on the actors' path).
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from flux_dist.cli import main

    sys.exit(main(["ray-generate", *sys.argv[1:]]))
