import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def torchrun_ref(tmp_path_factory):
    """The reference image for every launcher: torchrun, 2 ranks, the tiny config (Ulysses 2)."""
    from dist_utils import TINY, torchrun

    d = tmp_path_factory.mktemp("torchrun_ref")
    r = torchrun(2, "generate", *TINY, "--output", str(d / "u2.png"), "--metrics", str(d / "u2.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    return d / "u2.png"


@pytest.fixture(autouse=True)
def _launcher_env_is_restored():
    """A test that makes this process look like a rank (RANK, WORLD_SIZE, ...) must not leak it."""
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
    before = {k: os.environ.get(k) for k in keys}
    yield
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
