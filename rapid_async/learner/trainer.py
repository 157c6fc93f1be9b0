"""The learner's training state: model, optimizer, one update.

Used by the learner process (`rapid_async.learner`), which feeds it whole
groups from the buffer. Versions count optimizer steps: after `update` the
policy is at version `self.version`, and a group generated at version v and
consumed at version u has staleness u - v.

Checkpoints of this state (weights, optimizer, version, RNG, data position)
are written and loaded by `rapid_async.learner.checkpoint`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rapid_async.config import Config, resolve_device
from rapid_async.loss import (LossSettings, compute_loss, loss_normalisers, microbatch_loss,
                              row_advantages)
from rapid_async.learner.policy import (Batch, PolicyLogprobs, collate, plan_microbatches,
                                        splits_groups)
from rapid_async.learner.truncation import apply_truncated
from rapid_async.weights import INFERENCE_DTYPES, cast_state

log = logging.getLogger("rapid.learner")


def loss_settings(cfg: Config) -> LossSettings:
    """The loss settings of a run config."""
    a = cfg.algo
    return LossSettings(algorithm=a.loss, eta=a.eta, eps=a.eps, beta=a.beta,
                        aggregation=a.aggregation)


def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """`learner.compute_dtype` on a device: "auto" is bfloat16 on CUDA, float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return INFERENCE_DTYPES[name]


class Trainer:
    """Model, optimizer and reference model of the learner.

    Args:
        cfg: the run config.
        model_dir: Hugging Face model directory to start from.
    """

    def __init__(self, cfg: Config, model_dir: str | Path):
        self.cfg = cfg
        self.model_dir = Path(model_dir)
        torch.manual_seed(cfg.run.seed)
        self.device = torch.device(resolve_device(cfg.learner.device))
        self.compute_dtype = resolve_compute_dtype(cfg.learner.compute_dtype, self.device)
        self.model = self._load_model(model_dir, cfg.learner.activation_checkpointing)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.settings = loss_settings(cfg)
        self.ref_model = None
        if self.settings.beta > 0:
            self.ref_model = copy.deepcopy(self.model).eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)
        temperature, chunk = cfg.algo.temperature, cfg.learner.logprob_chunk_tokens
        self.policy = PolicyLogprobs(self.model, temperature, chunk)
        self.ref_policy = PolicyLogprobs(self.ref_model, temperature, chunk) if self.ref_model else None
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.learner.lr,
                                           weight_decay=cfg.learner.weight_decay)
        self.version = 0
        self.data_position = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0

    def _load_model(self, model_dir: str | Path, checkpointing: bool) -> torch.nn.Module:
        """The model with float32 master weights on the learner's device, in train mode."""
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=INFERENCE_DTYPES[self.cfg.model.train_dtype]).to(self.device)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        return model.train()

    def inference_state(self) -> dict[str, torch.Tensor]:
        """The weights as the actors must hold them: cast to the inference dtype."""
        return cast_state(self.model.state_dict(), self.cfg.model.inference_dtype)

    def update(self, groups: list[Any]) -> dict[str, Any]:
        """One optimizer step on a mini-batch of whole groups.

        Returns:
            Metrics: loss diagnostics, reward, staleness, gradient norm, and
            `guard/skipped` = 1 when the step was skipped (non-finite loss or
            gradient norm: no optimizer step, the version stays).
        """
        return self.step(collate(groups, pad_id=self.pad_id))

    def step(self, batch: Batch) -> dict[str, Any]:
        """Accumulate the gradient of `batch` over micro-batches, then step (or skip)."""
        t0, version = time.perf_counter(), self.version
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        plan = plan_microbatches(batch.lengths, batch.group_size, self.cfg.learner.micro_batch_tokens)
        raw, keep = batch, None  # algo.truncated: rewards to train on, rows in the loss
        rewards, loss_rows = apply_truncated(batch.rewards, batch.truncated, self.cfg.algo.truncated)
        batch = dataclasses.replace(batch, rewards=rewards)
        if loss_rows is not None:
            keep = loss_rows.to(batch.mask.dtype)  # (B,)
        rows, tokens = loss_normalisers(batch.mask if keep is None else batch.mask * keep[:, None])
        advantages = self._advantages_first(batch, plan)
        logprobs = torch.zeros(batch.mask.shape, dtype=torch.float32)  # (B, T), detached
        ref = torch.zeros_like(logprobs) if self.ref_policy is not None else None
        self.optimizer.zero_grad(set_to_none=True)
        for micro_rows in plan:
            lp, ref_lp = self._accumulate(batch, micro_rows, advantages, rows, tokens, keep)
            idx = torch.tensor(micro_rows)
            logprobs[idx, :lp.shape[1]] = lp
            if ref is not None:
                ref[idx, :ref_lp.shape[1]] = ref_lp
        with torch.no_grad():
            loss, metrics = compute_loss(logprobs, batch.behaviour_logprobs, batch.mask,
                                         batch.rewards, batch.group_size, self.settings,
                                         ref_logprobs=ref, loss_rows=loss_rows)
        if batch.truncated is not None:
            metrics["batch/truncated_frac"] = float(batch.truncated.float().mean())
        batch = raw
        clip = self.cfg.learner.grad_clip
        grad_norm = float(torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), clip if clip > 0 else float("inf")))
        stepped = self._step_or_skip(float(loss), grad_norm)
        metrics.update(self._batch_metrics(batch, logprobs, plan, version))
        metrics.update({"grad/norm": grad_norm, "guard/skipped": float(not stepped),
                        "guard/skipped_steps": float(self.skipped_steps),
                        "time/update_s": time.perf_counter() - t0})
        return metrics

    def _advantages_first(self, batch: Batch, plan: list[list[int]]) -> torch.Tensor | None:
        """Advantages of every row before any gradient pass, or None when each
        micro-batch can compute its own (it holds whole groups)."""
        needs_logprobs = self.settings.algorithm == "rapid"
        if needs_logprobs and not splits_groups(plan, batch.group_size):
            return None
        logprobs = torch.zeros(batch.mask.shape, dtype=torch.float32)  # (B, T)
        if needs_logprobs:  # a group is split: a no-grad pass over the mini-batch first
            with torch.no_grad():
                for micro_rows in plan:
                    lp = self._logprobs(self.policy, batch.select(micro_rows).to(self.device))
                    logprobs[torch.tensor(micro_rows), :lp.shape[1]] = lp.cpu()
        return row_advantages(logprobs, batch.behaviour_logprobs, batch.mask, batch.rewards,
                              batch.group_size, self.settings)

    def _logprobs(self, policy: torch.nn.Module, micro: Batch) -> torch.Tensor:
        """(b, T) float32 token log-probs of a micro-batch under `policy`, in the compute dtype."""
        with torch.autocast(self.device.type, dtype=self.compute_dtype,
                            enabled=self.compute_dtype != torch.float32):
            return policy(micro.input_ids, micro.attention_mask, micro.positions,
                          micro.completion_ids, micro.mask)

    def _accumulate(self, batch: Batch, micro_rows: list[int], advantages: torch.Tensor | None,
                    rows: float, tokens: float, keep: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Forward and backward of one micro-batch; returns its detached (b, T) log-probs
        (and reference log-probs) on the CPU. `keep` (B,) zeroes rows out of the loss
        (algo.truncated = "mask")."""
        micro = batch.select(micro_rows).to(self.device)
        lp = self._logprobs(self.policy, micro)  # (b, T)
        ref = None
        if self.ref_policy is not None:
            with torch.no_grad():
                ref = self._logprobs(self.ref_policy, micro)  # (b, T)
        if advantages is None:
            adv = row_advantages(lp.detach(), micro.behaviour_logprobs, micro.mask, micro.rewards,
                                 micro.group_size, self.settings)  # (b,)
        else:
            adv = advantages[torch.tensor(micro_rows)].to(self.device)  # (b,)
        loss_mask = micro.mask
        if keep is not None:
            loss_mask = micro.mask * keep[torch.tensor(micro_rows)].to(self.device)[:, None]
        loss = microbatch_loss(lp, micro.behaviour_logprobs, loss_mask, adv, self.settings,
                               rows, tokens, ref_logprobs=ref)
        loss.backward()
        return lp.detach().cpu(), (ref.cpu() if ref is not None else None)

    def _step_or_skip(self, loss: float, grad_norm: float) -> bool:
        """Take the optimizer step, or skip it when the loss or gradient norm is not finite."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.optimizer.step()
            self.version += 1
            self.consecutive_skips = 0
            return True
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_steps += 1
        self.consecutive_skips += 1
        log.warning("skipped a step at version %d: loss %s, gradient norm %s (%d skipped so far)",
                    self.version, loss, grad_norm, self.skipped_steps)
        limit = self.cfg.learner.max_skipped_steps
        if limit and self.consecutive_skips >= limit:
            raise RuntimeError(f"{self.consecutive_skips} consecutive steps had a non-finite loss "
                               f"or gradient norm (learner.max_skipped_steps = {limit}): training "
                               "diverged; lower learner.lr or check the data")
        return False

    def _batch_metrics(self, batch: Batch, logprobs: torch.Tensor, plan: list[list[int]],
                       version: int) -> dict[str, float]:
        """Reward, staleness (at the version trained on), engine mismatch, micro-batching."""
        staleness = (version - batch.policy_versions).float()  # (B,)
        metrics = {"reward/mean": float(batch.rewards.mean()),
                   "staleness/mean": float(staleness.mean()),
                   "staleness/max": float(staleness.max()),
                   "batch/tokens": float(batch.mask.sum()),
                   "batch/microbatches": float(len(plan)),
                   "batch/padded_tokens": float(sum(len(r) * max(batch.lengths[i] for i in r)
                                                    for r in plan))}
        fresh = (staleness == 0).float().unsqueeze(1) * batch.mask  # (B, T)
        if fresh.sum() > 0:
            # At staleness 0 the actor's and the learner's weights are the same
            # bits, so |delta| is purely inference-engine vs trainer mismatch.
            delta = (logprobs - batch.behaviour_logprobs).abs()
            metrics["mismatch/engine_abs_delta"] = float((delta * fresh).sum() / fresh.sum())
        if self.device.type == "cuda":
            metrics["memory/peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return metrics
