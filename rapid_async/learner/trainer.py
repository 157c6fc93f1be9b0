"""The learner's training state: model, optimizer, one update.

Used by the learner process (`rapid_async.learner`), which feeds it whole
groups from the buffer. Versions count optimizer steps: after `update` the
policy is at version `self.version`, and a group generated at version v and
consumed at version u has staleness u - v.

One update (`step`): the mini-batch is planned into micro-batches of whole
groups under `learner.micro_batch_tokens` (`policy.plan_microbatches`), each
runs forward and backward in `learner.compute_dtype` (bf16 autocast on CUDA
over float32 master weights and AdamW state) and adds its exact share of the
mini-batch loss (`loss.microbatch_loss`), then one optimizer step, or none
when the loss or the gradient norm is not finite (the guard: the version
stays, `guard/skipped_steps` counts it). With several learner ranks
(`distributed.py`, FSDP2) every rank runs `step` on its own groups of the
same mini-batch and the result equals one rank's.

With `learner.lora` the model is a peft model (`learner/lora.py`): only the
adapters are in the optimizer, the KL reference is the base (adapters off),
and what is published and checkpointed as weights is the merged view.

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
from rapid_async.learner.distributed import (CHECKPOINT, GATHER, PARAMS, UPDATE, SameOnEveryRank,
                                             all_sum_, full_tensor, init_ranks, send_command,
                                             shard)
from rapid_async.learner import lora
from rapid_async.learner.distributed import close as close_ranks
from rapid_async.learner.policy import (Batch, PolicyLogprobs, collate, plan_microbatches,
                                        rank_rows, save_batch, splits_groups)
from rapid_async.learner.packing import packed_rank_rows, packed_tokens, plan_packed_microbatches
from rapid_async.learner.truncation import apply_truncated
from rapid_async.loss.mismatch import mismatch_metrics
from rapid_async.weights import INFERENCE_DTYPES, cast_state

log = logging.getLogger("rapid.learner")


class TrainingDiverged(SameOnEveryRank):
    """`learner.max_skipped_steps` consecutive steps were non-finite. Every
    rank sees the same summed loss and gradient norm, so every rank raises it
    at the same point."""


def loss_settings(cfg: Config) -> LossSettings:
    """The loss settings of a run config."""
    a = cfg.algo
    return LossSettings(algorithm=a.loss, eta=a.eta, eps=a.eps, beta=a.beta,
                        aggregation=a.aggregation, baseline=a.baseline)


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
        model: a causal LM already built, used instead of loading model_dir's
            weights (benchmarks build large shapes from code); the tokenizer
            still comes from model_dir.
    """

    def __init__(self, cfg: Config, model_dir: str | Path, model: torch.nn.Module | None = None):
        self.cfg = cfg
        self.model_dir = Path(model_dir)
        torch.manual_seed(cfg.run.seed)
        self.ranks, self.device = init_ranks(resolve_device(cfg.learner.device))
        self.compute_dtype = resolve_compute_dtype(cfg.learner.compute_dtype, self.device)
        self.model = self._load_model(model_dir, cfg.learner.activation_checkpointing, model)
        self.hf_model = self.model  # the plain transformers model (LoRA: peft's base model)
        self.lora = bool(cfg.learner.lora)
        if self.lora:  # learner/lora.py: peft adapters, the rest frozen
            self.model = lora.wrap(self.model, cfg.learner)
            self.hf_model = self.model.get_base_model()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.settings = loss_settings(cfg)
        temperature, chunk = cfg.algo.temperature, cfg.learner.logprob_chunk_tokens
        packing = cfg.learner.packing
        self.policy = PolicyLogprobs(self.hf_model, temperature, chunk, packing)
        self.ref_model, self.ref_policy = None, None
        if self.settings.beta > 0 and self.lora:  # the base: the adapters off, no copy
            self.ref_policy = lora.AdapterOff(self.policy, self.model)
        elif self.settings.beta > 0:
            self.ref_model = copy.deepcopy(self.model).eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)
            self.ref_policy = PolicyLogprobs(self.ref_model, temperature, chunk, packing)
        if self.ranks.world > 1:
            shard(self.policy, self.model, self.device, self.ranks.world)
            if self.ref_model is not None:
                shard(self.ref_policy, self.ref_model, self.device, self.ranks.world)
        self.optimizer = torch.optim.AdamW(lora.trainable_parameters(self.model),
                                           lr=cfg.learner.lr,
                                           weight_decay=cfg.learner.weight_decay)
        self.version = 0
        self.data_position = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.recorded = 0
        self.replay_recorder = None  # start_replay_record (learner/replay_record.py)

    def _load_model(self, model_dir: str | Path, checkpointing: bool,
                    model: torch.nn.Module | None = None) -> torch.nn.Module:
        """The model with float32 master weights on the learner's device, in train mode."""
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=INFERENCE_DTYPES[self.cfg.model.train_dtype])
        model = model.to(self.device)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        return model.train()

    def published_weights(self) -> Any:
        """What the weight publisher publishes: the model (its `named_parameters`),
        or with LoRA the merged view (`lora.MergedWeights`: base names, W + scale B A)."""
        return lora.MergedWeights(self.model) if self.lora else self.model

    def inference_state(self) -> dict[str, torch.Tensor]:
        """The weights as the actors must hold them: cast to the inference dtype.

        With several ranks (called on rank 0) the followers take part in the gather.
        """
        if self.ranks.world > 1:
            send_command(self.ranks, GATHER)
        return self.gather_inference_state()

    def publish_params(self) -> list[torch.Tensor]:
        """Rank 0 with several ranks: the full parameters in `named_parameters`
        order, in the inference dtype, on this device (the weight publisher's
        `gather`); the followers join."""
        send_command(self.ranks, PARAMS)
        return self.gather_params()

    def gather_params(self) -> list[torch.Tensor]:
        """Every rank: gather the parameters one at a time; rank 0 keeps them, cast."""
        target, out = INFERENCE_DTYPES[self.cfg.model.inference_dtype], []
        for _, p in self.model.named_parameters():
            whole = full_tensor(p.detach())
            if self.ranks.leader:
                out.append(whole.to(target))
        return out

    def gather_inference_state(self) -> dict[str, torch.Tensor]:
        """Every rank: gather full weights one tensor at a time; rank 0 keeps them
        (cast on the device first), the others return {}."""
        dtype = self.cfg.model.inference_dtype
        if self.ranks.world == 1:
            return cast_state(self.published_weights().state_dict(), dtype)
        target, full = INFERENCE_DTYPES[dtype], {}
        for name, tensor in self.model.state_dict().items():
            whole = full_tensor(tensor.detach())
            if self.ranks.leader:
                full[name] = whole.to(target) if whole.is_floating_point() else whole
        return cast_state(full, dtype) if self.ranks.leader else {}

    def update(self, groups: list[Any]) -> dict[str, Any]:
        """One optimizer step on a mini-batch of whole groups (rank 0 shares it out).

        Returns:
            Metrics: loss diagnostics, reward, staleness, gradient norm, and
            `guard/skipped` = 1 when the step was skipped (non-finite loss or
            gradient norm: no optimizer step, the version stays).
        """
        batch = collate(groups, pad_id=self.pad_id)
        if self.cfg.learner.record_batches:
            self._record(batch)
        version = self.version
        metrics = self._step_on_every_rank(batch)
        recorder = getattr(self, "replay_recorder", None)
        if recorder is not None:
            t0 = time.perf_counter()
            metrics["replay/bytes"] = float(recorder.record(
                batch, version, self.version, not metrics.get("guard/skipped")))
            metrics["replay/record_s"] = time.perf_counter() - t0
        return metrics

    def _step_on_every_rank(self, batch: Batch) -> dict:
        """One step here, and on the follower ranks (sent the batch first) if there are any."""
        if self.ranks.world == 1:
            return self.step(batch)
        send_command(self.ranks, UPDATE, batch)
        try:
            return self.step(batch)
        except SameOnEveryRank:
            raise  # every rank raised it after the same collectives: still in step
        except BaseException as exc:
            self.ranks.broken = f"rank 0 failed in a step: {type(exc).__name__}: {exc}"
            raise

    def start_replay_record(self, resumed: bool = False) -> bool:
        """Record every update for `rapid-replay` from now on, if `learner.record_replay`
        says so (on, or auto: a one-rank CPU learner); the Learner calls it before its
        first step. Not for a resumed run (its record is the first incarnation's).
        Returns whether it records."""
        mode = self.cfg.learner.record_replay
        if mode == "off" or (mode == "auto" and (self.device.type != "cpu" or self.ranks.world > 1)):
            return False
        if resumed or self.version != 0:
            log.warning("not recording for replay: a resumed run (the record in %s/replay "
                        "ends where the first incarnation stopped)", self.cfg.run.run_dir)
            return False
        from rapid_async.learner.replay_record import ReplayRecorder
        meta = {"seed": self.cfg.run.seed, "model_dir": str(self.model_dir.resolve()),
                "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                "device": str(self.device)}
        self.replay_recorder = ReplayRecorder(self.cfg.run.run_dir, meta, self.model, self.version)
        return True

    def _record(self, batch: Batch) -> None:
        """Save the mini-batch to RUN_DIR/batches/batch-NNNNNNNN.safetensors, in order."""
        root = Path(self.cfg.run.run_dir) / "batches"
        root.mkdir(parents=True, exist_ok=True)
        self.recorded += 1
        save_batch(batch, root / f"batch-{self.recorded:08d}.safetensors")

    def step(self, batch: Batch) -> dict[str, Any]:
        """Every rank: accumulate the gradient of its groups of `batch` over
        micro-batches, then step (or skip). The result equals one pass over the
        whole mini-batch on one rank."""
        t0, version = time.perf_counter(), self.version
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        plans = [self._plan(batch, r) for r in range(self.ranks.world)]
        passes = max(len(p) for p in plans)  # every rank makes as many passes (collectives)
        plan = plans[self.ranks.rank] + [[]] * (passes - len(plans[self.ranks.rank]))
        raw, keep = batch, None  # algo.truncated: rewards to train on, rows in the loss
        rewards, loss_rows = apply_truncated(batch.rewards, batch.truncated, self.cfg.algo.truncated)
        batch = dataclasses.replace(batch, rewards=rewards)
        if loss_rows is not None:
            keep = loss_rows.to(batch.mask.dtype)  # (B,)
        rows, tokens = loss_normalisers(batch.mask if keep is None else batch.mask * keep[:, None])
        advantages = None
        if self.settings.algorithm != "rapid" or any(splits_groups(p, batch.group_size) for p in plans):
            advantages = self._advantages_first(batch, plan)
        logprobs = torch.zeros(batch.mask.shape, dtype=torch.float32)  # (B, T), detached
        ref = torch.zeros_like(logprobs) if self.ref_policy is not None else None
        self.optimizer.zero_grad(set_to_none=True)
        for micro_rows in plan:
            self._accumulate(batch, micro_rows, advantages, rows, tokens, keep, logprobs, ref)
        all_sum_(logprobs, self.ranks)
        if ref is not None:
            all_sum_(ref, self.ranks)
        with torch.no_grad():
            loss, metrics = compute_loss(logprobs, batch.behaviour_logprobs, batch.mask,
                                         batch.rewards, batch.group_size, self.settings,
                                         ref_logprobs=ref, loss_rows=loss_rows)
        if batch.truncated is not None:
            metrics["batch/truncated_frac"] = float(batch.truncated.float().mean())
        batch = raw
        clip = self.cfg.learner.grad_clip
        grad_norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), clip if clip > 0 else float("inf"))))
        stepped = self._step_or_skip(float(loss), grad_norm)
        metrics.update(self._batch_metrics(batch, logprobs, plans, version))
        metrics.update({"grad/norm": grad_norm, "guard/skipped": float(not stepped),
                        "guard/skipped_steps": float(self.skipped_steps),
                        "time/update_s": time.perf_counter() - t0})
        return metrics

    def _plan(self, batch: Batch, rank: int) -> list[list[int]]:
        """Micro-batches (row indices of `batch`) of the groups that `rank` trains on."""
        lengths, k, budget = batch.lengths, batch.group_size, self.cfg.learner.micro_batch_tokens
        if self.cfg.learner.packing:  # balanced by real tokens
            mine = packed_rank_rows(lengths, k, rank, self.ranks.world)
            local = plan_packed_microbatches([lengths[i] for i in mine], k, budget)
        else:
            mine = rank_rows(lengths, k, rank, self.ranks.world)
            local = plan_microbatches([lengths[i] for i in mine], k, budget)
        return [[mine[i] for i in rows] for rows in local]

    def _advantages_first(self, batch: Batch, plan: list[list[int]]) -> torch.Tensor:
        """Advantages of every row before any gradient pass: needed when a group is
        split over micro-batches ("rapid" then needs a no-grad pass for its
        weights) and cheap when advantages depend on rewards only."""
        logprobs = torch.zeros(batch.mask.shape, dtype=torch.float32)  # (B, T)
        if self.settings.algorithm == "rapid":
            with torch.no_grad():
                for micro_rows in plan:
                    micro = batch.select(micro_rows or self._padding_rows(batch))
                    lp = self._logprobs(self.policy, micro.to(self.device))
                    if micro_rows:
                        logprobs[torch.tensor(micro_rows), :lp.shape[1]] = lp.cpu()
            all_sum_(logprobs, self.ranks)
        return row_advantages(logprobs, batch.behaviour_logprobs, batch.mask, batch.rewards,
                              batch.group_size, self.settings)

    @staticmethod
    def _padding_rows(batch: Batch) -> list[int]:
        return list(range(batch.group_size))

    def _logprobs(self, policy: torch.nn.Module, micro: Batch) -> torch.Tensor:
        """(b, T) float32 token log-probs of a micro-batch under `policy`, in the compute dtype."""
        with torch.autocast(self.device.type, dtype=self.compute_dtype,
                            enabled=self.compute_dtype != torch.float32):
            return policy(micro.input_ids, micro.attention_mask, micro.positions,
                          micro.completion_ids, micro.mask)

    def _accumulate(self, batch: Batch, micro_rows: list[int], advantages: torch.Tensor | None,
                    rows: float, tokens: float, keep: torch.Tensor | None,
                    logprobs: torch.Tensor, ref_out: torch.Tensor | None) -> None:
        """Forward and backward of one micro-batch; writes its detached log-probs
        (and reference log-probs) into the (B, T) CPU tensors. `keep` (B,) zeroes
        rows out of the loss (algo.truncated = "mask"). An empty `micro_rows` is
        a rank's padding pass: the first group with zero weight, so that every
        rank joins the same collectives."""
        idx = torch.tensor(micro_rows or self._padding_rows(batch))
        micro = batch.select(idx.tolist()).to(self.device)
        lp = self._logprobs(self.policy, micro)  # (b, T)
        ref = None
        if self.ref_policy is not None:
            with torch.no_grad():
                ref = self._logprobs(self.ref_policy, micro)  # (b, T)
        if advantages is None:
            adv = row_advantages(lp.detach(), micro.behaviour_logprobs, micro.mask, micro.rewards,
                                 micro.group_size, self.settings)  # (b,)
        else:
            adv = advantages[idx].to(self.device)  # (b,)
        loss_mask = micro.mask
        if keep is not None:
            loss_mask = micro.mask * keep[idx].to(self.device)[:, None]
        loss = microbatch_loss(lp, micro.behaviour_logprobs, loss_mask, adv, self.settings,
                               rows, tokens, ref_logprobs=ref)
        # FSDP averages gradients over ranks; each rank's share is a partial sum.
        (loss * (self.ranks.world if micro_rows else 0.0)).backward()
        if micro_rows:
            logprobs[idx, :lp.shape[1]] = lp.detach().cpu()
            if ref_out is not None:
                ref_out[idx, :ref.shape[1]] = ref.cpu()

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
            raise TrainingDiverged(
                f"{self.consecutive_skips} consecutive steps had a non-finite loss or gradient "
                f"norm (learner.max_skipped_steps = {limit}): training diverged; lower "
                "learner.lr or check the data")
        return False

    def _batch_metrics(self, batch: Batch, logprobs: torch.Tensor, plans: list[list[list[int]]],
                       version: int) -> dict[str, float]:
        """Reward, staleness (at the version trained on), engine mismatch, micro-batching."""
        staleness = (version - batch.policy_versions).float()  # (B,)
        metrics = {"reward/mean": float(batch.rewards.mean()),
                   "staleness/mean": float(staleness.mean()),
                   "staleness/max": float(staleness.max()),
                   "batch/tokens": float(batch.mask.sum()),
                   "batch/microbatches": float(max(len(p) for p in plans)),
                   "batch/padded_tokens": float(sum(self._run_tokens([batch.lengths[i] for i in r])
                                                    for p in plans for r in p))}
        # At staleness 0 the actor's and the learner's weights are the same bits,
        # so pi vs mu is purely inference-engine vs trainer mismatch: k3 (KL(mu||pi)
        # per token), ratios outside [0.5, 2], mean |delta| (loss/mismatch.py).
        metrics.update(mismatch_metrics(logprobs, batch.behaviour_logprobs, batch.mask,
                                        staleness == 0))
        if self.device.type == "cuda":
            metrics["memory/peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return metrics

    def _run_tokens(self, lengths: list[int]) -> int:
        """Tokens one pass over sequences of these lengths runs: padded or packed."""
        return packed_tokens(lengths) if self.cfg.learner.packing else len(lengths) * max(lengths)

    def adapter_state(self) -> dict[str, torch.Tensor] | None:
        """The LoRA adapter weights a checkpoint saves (None without LoRA)."""
        return lora.adapter_state(self.model) if self.lora else None

    def checkpoint_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Model and optimizer state to save (`checkpoint.capture`). With several
        ranks, rank 0 calls it and the followers join the gather."""
        if self.ranks.world == 1:  # LoRA: the merged weights; the optimizer holds adapters only
            return self.published_weights().state_dict(), self.optimizer.state_dict()
        send_command(self.ranks, CHECKPOINT)
        return self.gather_checkpoint_state()

    def gather_checkpoint_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Every rank: full model and optimizer state on rank 0's CPU (optimizer
        state keyed by parameter name), {} elsewhere."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(self.model, self.optimizer,
                              options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def close(self) -> None:
        """Stop the follower ranks (rank 0) and leave the process group."""
        close_ranks(self.ranks)
