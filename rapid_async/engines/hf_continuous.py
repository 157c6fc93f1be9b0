"""Continuous batching for the transformers engine (actor process).

`HFEngine.generate` runs every row of a request (prompts x n samples) in one
batch until the longest is done. With `GenerateRequest.max_batch` = B smaller
than the number of rows, `generate_continuous` keeps at most B rows in flight
instead: when a row finishes, its slot takes the next waiting row (its prompt
is prefilled alone, its KV spliced into the batch's cache, left-aligned with
padding like the others), and once no row waits, finished rows leave the
batch. Columns of the cache that are padding in every row are trimmed.

Sampling, log-probs, EOS and stop strings, and in-flight weight updates
(`step_hook`, KV kept or `recompute`) follow `HFEngine.generate`; for greedy
decoding each completion equals the one a request of its prompt alone gives
(up to floating-point differences of padded attention).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from rapid_async.engines.base import Completion, GenerateRequest, stop_window


@dataclass
class _Row:
    """One completion being generated: its prompt and what it has so far."""

    job: int
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    finish: str | None = None


class _Batch:
    """The rows in flight: their KV cache, attention mask and next positions."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.rows: list[_Row] = []
        self.past: Any = None
        self.mask: torch.Tensor | None = None  # (B, L)
        self.pos: torch.Tensor | None = None  # (B, 1) position of each row's next input

    def prefill(self, contexts: list[list[int]]) -> tuple[Any, torch.Tensor, torch.Tensor,
                                                          torch.Tensor]:
        """Left-padded forward over whole contexts: (cache, mask, next positions, last logits)."""
        eng = self.engine
        width = max(len(c) for c in contexts)
        ids = torch.full((len(contexts), width), eng.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(contexts), width), dtype=torch.long)
        for r, ctx in enumerate(contexts):
            ids[r, width - len(ctx):] = torch.tensor(ctx, dtype=torch.long)
            mask[r, width - len(ctx):] = 1
        ids, mask = ids.to(eng.device), mask.to(eng.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = eng.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                        use_cache=True)
        return out.past_key_values, mask, positions[:, -1:] + 1, out.logits[:, -1, :]

    def rebuild(self) -> torch.Tensor:
        """Prefill every row's prompt + tokens again (new weights); the next logits."""
        contexts = [row.prompt + row.tokens for row in self.rows]
        self.past, self.mask, self.pos, logits = self.prefill(contexts)
        return logits

    def splice(self, slot: int, row: _Row) -> torch.Tensor:
        """Put `row` in `slot`: prefill its prompt alone, write its KV right-aligned
        into the cache (padding the batch on the left if it is longer); its logits."""
        past, mask, pos, logits = self.prefill([row.prompt])
        p, width = mask.shape[1], self.mask.shape[1]
        if p > width:  # every other row gets more left padding
            self._pad_left(p - width)
            width = p
        for mine, new in zip(self.past.layers, past.layers):
            for name in ("keys", "values"):
                cached, fresh = getattr(mine, name), getattr(new, name)
                cached[slot].zero_()
                cached[slot, :, width - p:] = fresh[0]
        self.mask[slot] = 0
        self.mask[slot, width - p:] = 1
        self.pos[slot] = pos[0]
        self.rows[slot] = row
        return logits[0]

    def _pad_left(self, n: int) -> None:
        for layer in self.past.layers:
            for name in ("keys", "values"):
                t = getattr(layer, name)
                setattr(layer, name, torch.cat([t.new_zeros(*t.shape[:2], n, t.shape[3]), t], 2))
        self.mask = torch.cat([self.mask.new_zeros(self.mask.shape[0], n), self.mask], 1)

    def keep(self, slots: list[int]) -> None:
        """Drop every row not in `slots` (finished, none waiting), then trim padding."""
        index = torch.tensor(slots, device=self.mask.device)
        for layer in self.past.layers:
            for name in ("keys", "values"):
                setattr(layer, name, getattr(layer, name).index_select(0, index))
        self.mask, self.pos = self.mask.index_select(0, index), self.pos.index_select(0, index)
        self.rows = [self.rows[s] for s in slots]
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else 0
        if start:
            for layer in self.past.layers:
                for name in ("keys", "values"):
                    setattr(layer, name, getattr(layer, name)[:, :, start:].contiguous())
            self.mask = self.mask[:, start:]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed each row its newest token; the next logits (B, V)."""
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=-1)
        out = self.engine.model(input_ids=tokens[:, None], attention_mask=self.mask,
                                position_ids=self.pos, past_key_values=self.past, use_cache=True)
        self.past, self.pos = out.past_key_values, self.pos + 1
        return out.logits[:, -1, :]


def _finished(engine: Any, row: _Row, request: GenerateRequest) -> str | None:
    """Why `row` ends with its newest token (EOS, a stop string, the cap), or None."""
    if row.tokens[-1] in engine.eos_token_ids:
        return "stop"
    if request.stop:
        tail = row.tokens[-stop_window(tuple(request.stop)):]
        if any(s in engine._decoder()(tail) for s in request.stop):
            return "stop"
    return "length" if len(row.tokens) >= request.max_new_tokens else None


def _append(engine: Any, row: _Row, logits: torch.Tensor, request: GenerateRequest,
            generator: torch.Generator, label: int) -> None:
    """Sample one token of `row` from its (V,) logits and note whether it ends the row."""
    token, logprob = engine._pick(logits[None], request.temperature, generator)
    row.tokens.append(int(token[0]))
    row.logprobs.append(float(logprob[0]))
    row.versions.append(label)
    row.finish = _finished(engine, row, request)


@torch.no_grad()
def generate_continuous(engine: Any, request: GenerateRequest,
                        generator: torch.Generator) -> list[list[Completion]]:
    """Sample request.n completions per prompt with at most request.max_batch
    rows in flight (see the module docstring). Returns them in prompt order."""
    waiting = [_Row(job=i * request.n + j, prompt=list(p))
               for i, p in enumerate(request.prompts) for j in range(request.n)]
    waiting.reverse()  # pop() takes the next row in order
    done: dict[int, _Row] = {}
    hook = request.step_hook
    label = hook() if hook is not None else 0
    batch = _Batch(engine)
    batch.rows = [waiting.pop() for _ in range(min(request.max_batch, len(waiting)))]
    batch.past, batch.mask, batch.pos, logits = batch.prefill([r.prompt for r in batch.rows])
    while batch.rows:
        keep, spliced = [], False
        for slot, row in enumerate(batch.rows):
            _append(engine, row, logits[slot], request, generator, label)
            while row.finish is not None:
                done[row.job] = row
                if not waiting:
                    break
                # The slot takes the next row: prefill its prompt, sample its first token.
                row = waiting.pop()
                _append(engine, row, batch.splice(slot, row), request, generator, label)
                spliced = True
            if row.finish is None:
                keep.append(slot)
        if not keep:
            break
        if len(keep) < len(batch.rows) or spliced:
            batch.keep(keep)
        changed = False
        if hook is not None:
            new_label = hook()
            changed, label = new_label != label, new_label
        if changed and request.recompute:
            logits = batch.rebuild()  # every row's context again, under the new weights
            continue
        logits = batch.step(torch.tensor([row.tokens[-1] for row in batch.rows],
                                         device=engine.device))
    completions = [Completion(r.tokens, r.logprobs, r.finish,
                              r.versions if hook is not None else None)
                   for r in (done[j] for j in sorted(done))]
    return [completions[i:i + request.n] for i in range(0, len(completions), request.n)]
