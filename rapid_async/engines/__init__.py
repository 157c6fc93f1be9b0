"""The inference engines actors (and rapid-eval) generate with.

Modules:
    hf.py     transformers (CPU or GPU)
    vllm.py   vLLM (GPU, or its CPU build)

`make_engine` builds the one a config names; each engine module is imported
only when it is used (vLLM is an optional dependency).
"""

from __future__ import annotations

from typing import Any


def make_engine(name: str, model_dir: str, dtype: str, device: str, seed: int) -> Any:
    """Build the inference engine named in the config."""
    if name == "hf":
        from rapid_async.engines.hf import HFEngine

        return HFEngine(model_dir, device=device, dtype=dtype, seed=seed)
    if name == "vllm":
        from rapid_async.engines.vllm import VLLMEngine

        return VLLMEngine(model_dir, dtype=dtype, seed=seed)
    raise ValueError(f"actor.engine = {name!r} is not one of hf, vllm")
