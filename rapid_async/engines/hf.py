"""The transformers inference engine: the embedded default, runs on a CPU.

Implements the `Engine` interface of `engines/base.py` for the actor process
with a plain KV-cached sampling loop over a Hugging Face causal LM, rather
than `model.generate`: the loop samples from exactly softmax(logits / T) (no
top-k / top-p / repetition penalty that `generate` may add from a generation
config), and returns the log-probability of each sampled token under that same
distribution, which is what the learner's importance weights need.

All prompts x n samples run as one left-padded batch. Temperature 0 means
greedy decoding (used for evaluation); its log-probs are log_softmax of the
raw logits at the chosen token.

Weights are replaced in place by `load_weights`, with strict name, shape and
dtype checks; a tied `lm_head.weight` may be given or left out. The actor's
weight receiver goes further: `weight_buffer` makes every parameter a view
of one flat buffer on the engine's device, which the receiver then updates in
place (only the changed elements are written; no host copy of the model).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from rapid_async.engines.base import Completion, GenerateRequest, stop_window

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    """Map a dtype name ("float32", "bfloat16", "float16") to a torch dtype."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


class HFEngine:
    """Sample completions with transformers, in one batch per request.

    Supports in-flight weight updates (`supports_step_hook`): a request's
    `step_hook` runs between decode steps and may rewrite the weights in
    place; the KV cache is kept across the change, or rebuilt under the new
    weights with `request.recompute`.

    Args:
        model_dir: a Hugging Face model directory (config + safetensors).
        device: torch device, e.g. "cpu" or "cuda:0".
        dtype: inference dtype name, see `DTYPES`.
        seed: seeds sampling for requests that carry no seed of their own.
    """

    supports_step_hook = True

    def __init__(self, model_dir: str | Path, device: str = "cpu", dtype: str = "float32",
                 seed: int = 0):
        self.device = torch.device(device)
        self.dtype = parse_dtype(dtype)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=self.dtype)
        self._setup(model, seed)
        self.model_dir = str(model_dir)

    @classmethod
    def from_model(cls, model: torch.nn.Module, seed: int = 0) -> HFEngine:
        """Wrap a model already in memory (shared, not copied), e.g. during training.

        Args:
            model: a Hugging Face causal LM; its device and dtype are kept.
            seed: seeds sampling for requests that carry no seed of their own.
        """
        engine = cls.__new__(cls)
        first = next(model.parameters())
        engine.device, engine.dtype = first.device, first.dtype
        engine._setup(model, seed)
        engine.model_dir = getattr(model.config, "_name_or_path", "") or None
        return engine

    def _setup(self, model: torch.nn.Module, seed: int) -> None:
        """Read token ids and parameter names from `model` and seed sampling."""
        self.model = model.to(self.device).eval()
        config = model.config
        eos = getattr(model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = config.eos_token_id
        if eos is None:
            raise ValueError("the model config names no eos_token_id; set config.eos_token_id")
        self.eos_token_ids = set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}
        pad = config.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else min(self.eos_token_ids)
        self.vocab_size = int(config.vocab_size)
        self._generator = torch.Generator(device=self.device).manual_seed(seed)
        self._expected = {name: (t.shape, t.dtype) for name, t in model.state_dict().items()}
        self._parameters = dict(model.named_parameters())
        self._tied = {name for name in self._expected if name not in self._parameters}
        self.tokenizer = None  # loaded on the first request with stop strings

    def _decoder(self):
        """token ids -> text, for stop strings (the model directory's tokenizer)."""
        if self.tokenizer is None:
            if not self.model_dir:
                raise ValueError("stop strings need a tokenizer: set engine.tokenizer")
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        return lambda ids: self.tokenizer.decode(ids, skip_special_tokens=False)

    def _hit_stop(self, tokens_out: torch.Tensor, step: int, active: torch.Tensor,
                  stops: tuple[str, ...]) -> torch.Tensor:
        """(B,) bool: active rows whose token at `step` completes a stop string."""
        decode, window = self._decoder(), stop_window(stops)
        hit = torch.zeros(tokens_out.shape[0], dtype=torch.bool)
        for row in torch.nonzero(active.cpu()).flatten().tolist():
            tail = decode(tokens_out[row, max(0, step + 1 - window):step + 1].tolist())
            hit[row] = any(s in tail for s in stops)
        return hit.to(active.device)

    # ------------------------------------------------------------------ generate

    def _check_request(self, request: GenerateRequest) -> None:
        """Raise ValueError naming the field of `request` that is unusable."""
        if request.n < 1:
            raise ValueError(f"n must be >= 1, got {request.n}")
        if not request.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {request.temperature}")
        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
        for i, prompt in enumerate(request.prompts):
            if len(prompt) == 0:
                raise ValueError(f"prompts[{i}] is empty; every prompt needs at least one token")
            if min(prompt) < 0 or max(prompt) >= self.vocab_size:
                raise ValueError(f"prompts[{i}] has token ids outside [0, {self.vocab_size})")

    def _left_pad(self, prompts: list[list[int]], n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Repeat each prompt n times and left-pad into one batch.

        Returns:
            input_ids (B, L) and attention_mask (B, L), B = len(prompts) * n.
        """
        width = max(len(p) for p in prompts)
        rows = [p for p in prompts for _ in range(n)]
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, prompt in enumerate(rows):
            ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _pick(self, logits: torch.Tensor, temperature: float,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose the next token of every row.

        Args:
            logits: (B, V) next-token logits.
            temperature: > 0 samples from softmax(logits / T); 0 takes the argmax.
            generator: the random stream.

        Returns:
            tokens (B,) and their log-probs (B,) under the distribution used.
        """
        logits = logits.float()
        if temperature == 0.0:
            logprobs = torch.log_softmax(logits, dim=-1)
            tokens = logits.argmax(dim=-1)
        else:
            logprobs = torch.log_softmax(logits / temperature, dim=-1)
            tokens = torch.multinomial(logprobs.exp(), 1, generator=generator).squeeze(-1)
        return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)

    @torch.no_grad()
    def generate(self, request: GenerateRequest) -> list[list[Completion]]:
        """Sample `request.n` completions for each prompt, all in one batch.

        Generation of a row ends at EOS or at the token that completes one of
        `request.stop` (checked on the decoded tail of each row every step).

        Returns:
            One list of `n` completions per prompt, in prompt order.
        """
        self._check_request(request)
        if not request.prompts:
            return []
        generator = self._generator
        if request.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(request.seed)
        if 0 < request.max_batch < len(request.prompts) * request.n:
            from rapid_async.engines.hf_continuous import generate_continuous

            return generate_continuous(self, request, generator)
        ids, mask = self._left_pad(request.prompts, request.n)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        batch, width = ids.shape
        tokens_out = torch.zeros((batch, request.max_new_tokens), dtype=torch.long)
        logprobs_out = torch.zeros((batch, request.max_new_tokens), dtype=torch.float32)
        versions_out = torch.zeros((batch, request.max_new_tokens), dtype=torch.long)
        lengths = torch.full((batch,), request.max_new_tokens, dtype=torch.long)
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        eos = torch.tensor(sorted(self.eos_token_ids), device=self.device)
        hook = request.step_hook
        label = hook() if hook is not None else 0
        past, step_ids, step_pos = None, ids, positions
        for step in range(request.max_new_tokens):
            if hook is not None and step > 0:
                new_label = hook()
                if new_label != label and request.recompute:
                    # Re-prefill everything so far under the new weights.
                    past = None
                    step_ids = torch.cat([ids, tokens_out[:, :step].to(self.device)], dim=-1)
                    step_pos = (mask.cumsum(-1) - 1).clamp(min=0)
                label = new_label
            out = self.model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                             past_key_values=past, use_cache=True)
            past = out.past_key_values
            tokens, logprobs = self._pick(out.logits[:, -1, :], request.temperature, generator)
            tokens = torch.where(done, self.pad_token_id, tokens)
            tokens_out[:, step] = tokens.cpu()
            logprobs_out[:, step] = logprobs.cpu()
            versions_out[:, step] = label
            finished_now = ~done & torch.isin(tokens, eos)
            if request.stop:
                finished_now |= self._hit_stop(tokens_out, step, ~done & ~finished_now,
                                               tuple(request.stop))
            lengths[finished_now.cpu()] = step + 1
            done |= finished_now
            if bool(done.all()):
                break
            step_ids = tokens[:, None]
            step_pos = step_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        return self._collect(tokens_out, logprobs_out, lengths, done.cpu(), request.n,
                             versions_out if hook is not None else None)

    @staticmethod
    def _collect(tokens: torch.Tensor, logprobs: torch.Tensor, lengths: torch.Tensor,
                 stopped: torch.Tensor, n: int,
                 versions: torch.Tensor | None = None) -> list[list[Completion]]:
        """Cut each row at its length and group rows by prompt.

        Args:
            tokens: (B, T) sampled ids; logprobs: (B, T); lengths: (B,);
            stopped: (B,) whether the row emitted EOS; n: rows per prompt;
            versions: (B, T) weight label per token (None: no step hook).
        """
        completions = [
            Completion(token_ids=tokens[row, :length].tolist(),
                       logprobs=logprobs[row, :length].tolist(),
                       finish_reason="stop" if bool(stopped[row]) else "length",
                       versions=None if versions is None else versions[row, :length].tolist())
            for row, length in enumerate(lengths.tolist())
        ]
        return [completions[i:i + n] for i in range(0, len(completions), n)]

    # ------------------------------------------------------------------ weights

    def _validate(self, named_tensors: dict[str, torch.Tensor]) -> None:
        """Raise ValueError naming the first tensor that does not fit the model."""
        for name, tensor in named_tensors.items():
            if name not in self._expected:
                raise ValueError(f"load_weights: unknown tensor {name!r}; the model has no such"
                                 " parameter (expected Hugging Face names as in model.safetensors)")
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"load_weights: {name!r} is a {type(tensor).__name__}, not a tensor")
            shape, dtype = self._expected[name]
            if tensor.shape != shape:
                raise ValueError(f"load_weights: {name!r} has shape {tuple(tensor.shape)},"
                                 f" the model expects {tuple(shape)}")
            if tensor.dtype != dtype:
                raise ValueError(f"load_weights: {name!r} has dtype {tensor.dtype}, the engine runs"
                                 f" in {dtype}; cast to the inference dtype before sending")
        missing = sorted(set(self._parameters) - set(named_tensors))
        if missing:
            raise ValueError(f"load_weights: {len(missing)} parameter(s) missing, e.g. {missing[0]!r};"
                             " a full set of weights is required")

    @torch.no_grad()
    def load_weights(self, named_tensors: dict[str, torch.Tensor]) -> None:
        """Replace every parameter in place; validated in full before any copy.

        Args:
            named_tensors: all parameters, Hugging Face names, inference dtype.
                A tied weight (e.g. lm_head.weight tied to the embedding) may be
                left out; if given it must equal the tensor it is tied to.
        """
        self._validate(named_tensors)
        for name in self._tied & set(named_tensors):
            source = self._tie_source(name)
            if not torch.equal(named_tensors[name], named_tensors[source]):
                raise ValueError(f"load_weights: {name!r} is tied to {source!r} in this model but"
                                 " the two tensors differ")
        for name, parameter in self._parameters.items():
            parameter.copy_(named_tensors[name].to(self.device))

    def expected_tensors(self) -> tuple[dict[str, tuple[int, ...]], set[str], torch.dtype]:
        """What the model holds: (required name -> shape, optional names, dtype).

        Required are the parameters, each tied one under its first name; the
        other names of tied parameters (e.g. lm_head.weight) are optional.
        """
        required = {name: tuple(p.shape) for name, p in self._parameters.items()}
        return required, set(self._tied), self.dtype

    @torch.no_grad()
    def weight_buffer(self, layout) -> torch.Tensor:
        """Make the parameters views of one new flat buffer (current values kept).

        Args:
            layout: a `rapid_async.weights.Layout` naming exactly this model's
                parameters (tied ones once) in the engine's dtype.

        Returns:
            The (layout.numel,) buffer on the engine's device; writing into it
            changes the weights the engine generates with.
        """
        required, optional, dtype = self.expected_tensors()
        layout.check_fits(required, optional, dtype)
        flat = layout.allocate(self.device)
        for name, view in layout.views(flat).items():
            parameter = self._parameters.get(name)
            if parameter is None:
                raise ValueError(f"weight_buffer: {name!r} is tied; the layout must name "
                                 f"the parameter it shares storage with")
            view.copy_(parameter)
            parameter.data = view
        return flat

    def weights_updated(self) -> None:
        """The flat buffer changed; the model reads it directly, so nothing to do."""

    def _tie_source(self, name: str) -> str:
        """The parameter name that the tied state-dict entry `name` shares storage with."""
        pointer = self.model.state_dict()[name].data_ptr()
        for other, parameter in self._parameters.items():
            if parameter.data_ptr() == pointer:
                return other
        raise ValueError(f"load_weights: cannot find the parameter {name!r} is tied to")

    def close(self) -> None:
        """Drop the model (frees its memory once no one else holds it)."""
        self.model = None
