"""flux-dist: serve one FLUX.2 request on many GPUs (sequence parallel, CFG parallel)."""

__version__ = "0.1.0"

__all__ = ["Engine", "RequestConfig", "RunConfig", "load_config", "__version__"]


def __getattr__(name: str):
    # Lazy: importing the package must not pull in torch/diffusers (the CLI's --help stays fast).
    if name == "Engine":
        from .engine import Engine

        return Engine
    if name in ("RequestConfig", "RunConfig", "load_config"):
        from . import config

        return getattr(config, name)
    raise AttributeError(name)
