"""The learner's training state: model, optimizer, one update, checkpoints.

Used by the learner process (`rapid_async.learner`), which feeds it whole
groups from the buffer. Versions count optimizer steps: after `update` the
policy is at version `self.version`, and a group generated at version v and
consumed at version u has staleness u - v.

Checkpoints are Hugging Face model directories plus `trainer_state.pt`
(optimizer, version, RNG, data position), written to a temporary directory and
renamed into place, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rapid_async.config import Config
from rapid_async.loss import LossSettings, compute_loss
from rapid_async.learner.policy import collate, token_logprobs
from rapid_async.weights import INFERENCE_DTYPES, cast_state

CHECKPOINT_PREFIX = "step-"


def loss_settings(cfg: Config) -> LossSettings:
    """The loss settings of a run config."""
    a = cfg.algo
    return LossSettings(algorithm=a.loss, eta=a.eta, eps=a.eps, beta=a.beta,
                        aggregation=a.aggregation)


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
        dtype = INFERENCE_DTYPES[cfg.model.train_dtype]
        self.device = torch.device(cfg.learner.device)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(self.device)
        self.model.train()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.settings = loss_settings(cfg)
        self.ref_model = None
        if self.settings.beta > 0:
            self.ref_model = copy.deepcopy(self.model).eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.learner.lr,
                                           weight_decay=cfg.learner.weight_decay)
        self.version = 0
        self.data_position = 0

    def inference_state(self) -> dict[str, torch.Tensor]:
        """The weights as the actors must hold them: cast to the inference dtype."""
        return cast_state(self.model.state_dict(), self.cfg.model.inference_dtype)

    def update(self, groups: list[Any]) -> dict[str, Any]:
        """One optimizer step on a mini-batch of whole groups.

        Returns:
            Metrics: loss diagnostics, reward, staleness, gradient norm.
        """
        t0 = time.perf_counter()
        batch = collate(groups, pad_id=self.pad_id).to(self.device)
        logprobs = token_logprobs(self.model, batch, self.cfg.algo.temperature)  # (B, T)
        ref = None
        if self.ref_model is not None:
            with torch.no_grad():
                ref = token_logprobs(self.ref_model, batch, self.cfg.algo.temperature)
        loss, metrics = compute_loss(logprobs, batch.behaviour_logprobs, batch.mask,
                                     batch.rewards, batch.group_size, self.settings,
                                     ref_logprobs=ref)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.cfg.learner.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), clip if clip > 0 else float("inf"))
        self.optimizer.step()
        staleness = (self.version - batch.policy_versions).float()  # (B,)
        fresh = (staleness == 0).float().unsqueeze(1) * batch.mask  # (B, T)
        if fresh.sum() > 0:
            # At staleness 0 the actor's and the learner's weights are the same
            # bits, so |delta| is purely inference-engine vs trainer mismatch.
            delta = (logprobs.detach() - batch.behaviour_logprobs).abs()
            metrics["mismatch/engine_abs_delta"] = float((delta * fresh).sum() / fresh.sum())
        self.version += 1
        metrics.update({
            "reward/mean": float(batch.rewards.mean()),
            "staleness/mean": float(staleness.mean()),
            "staleness/max": float(staleness.max()),
            "grad/norm": float(grad_norm),
            "batch/tokens": float(batch.mask.sum()),
            "time/update_s": time.perf_counter() - t0,
        })
        return metrics

    # -- checkpoints
    def save_checkpoint(self, run_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write RUN_DIR/checkpoints/step-N atomically; return its path."""
        root = Path(run_dir) / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"{CHECKPOINT_PREFIX}{self.version:08d}"
        tmp = root / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        torch.save({
            "optimizer": self.optimizer.state_dict(),
            "version": self.version,
            "data_position": self.data_position,
            "torch_rng": torch.get_rng_state(),
            "extra": extra or {},
        }, tmp / "trainer_state.pt")
        (tmp / "rapid_checkpoint.json").write_text(json.dumps(
            {"version": self.version, "data_position": self.data_position}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        return final

    def load_checkpoint(self, path: str | Path) -> dict[str, Any]:
        """Restore weights, optimizer, version, RNG and data position."""
        path = Path(path)
        loaded = AutoModelForCausalLM.from_pretrained(path, dtype=self.model.dtype)
        self.model.load_state_dict(loaded.state_dict())
        state = torch.load(path / "trainer_state.pt", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.version = int(state["version"])
        self.data_position = int(state["data_position"])
        torch.set_rng_state(state["torch_rng"])
        return state.get("extra", {})


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir()
                  if p.name.startswith(CHECKPOINT_PREFIX) and (p / "rapid_checkpoint.json").is_file())
    return done[-1] if done else None
