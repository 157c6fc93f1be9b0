"""LoRA on the learner (`learner.lora`): peft adapters, and the merged weights actors get.

Used by the learner process (`Trainer`) when `learner.lora` is on:

    wrap                 peft wraps the policy model: adapters A (r x in) and
                         B (out x r, zero at the start) on every target
                         Linear; every other weight is frozen
    trainable_parameters what the optimizer gets (the adapters only)
    AdapterOff           the KL reference (algo.beta > 0): the same model with
                         the adapters off (peft's `disable_adapter`), no copy
    MergedWeights        the weights as actors hold them, under the base
                         model's names: W + (alpha / r) B A per target module,
                         computed in the master dtype by peft's own
                         `get_delta_weight` (what `merge_and_unload` adds), then
                         cast by the weight publisher into its buffer, one
                         tensor at a time
    adapter_state, load_adapter, adapter_settings
                         the adapter weights a checkpoint saves (a peft
                         adapter directory) and resume loads back

Actors need no LoRA code: the publisher sends deltas of the merged view as it
sends deltas of a full model, so the actors' weights equal the merged weights
cast to the inference dtype, bit for bit (the update digests prove it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import torch

ADAPTER_DIR = "adapter"
"""A LoRA checkpoint's peft adapter directory (adapter_config.json, adapter_model.safetensors)."""
STRUCTURAL = {"r": "learner.lora_rank", "lora_alpha": "learner.lora_alpha",
              "target_modules": "learner.lora_target_modules"}
"""Adapter settings a resumed run must keep (they shape or scale the saved adapters)."""


def wrap(model: torch.nn.Module, learner: Any) -> torch.nn.Module:
    """The peft model (PeftModelForCausalLM) around `model`, adapters from `learner.lora_*`.

    Raises:
        ValueError: naming `learner.lora_target_modules` when they match no
            module of the model or a module whose weight is tied to another.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=learner.lora_rank, lora_alpha=learner.lora_alpha,
                        lora_dropout=learner.lora_dropout,
                        target_modules=list(learner.lora_target_modules), bias="none",
                        task_type="CAUSAL_LM")
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as err:
        raise ValueError(f"learner.lora_target_modules = {learner.lora_target_modules!r}: "
                         f"{err}") from err
    MergedWeights(peft_model)  # refuses tied targets now rather than at the first publish
    return peft_model


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters the optimizer steps: those that require gradients."""
    return [p for p in model.parameters() if p.requires_grad]


class AdapterOff(torch.nn.Module):
    """A policy's log-probs with the peft model's adapters off: the base model.

    Args:
        policy: the learner's `PolicyLogprobs` (over the LoRA-injected model).
        peft_model: the peft model whose `disable_adapter` switches the adapters off.
    """

    def __init__(self, policy: torch.nn.Module, peft_model: torch.nn.Module):
        super().__init__()
        self.policy = policy
        self._peft = [peft_model]  # not a submodule: no second registration of its weights

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        with self._peft[0].disable_adapter():
            return self.policy(*args)


def _is_adapter(name: str) -> bool:
    """An adapter parameter or buffer of peft (lora_A, lora_B, lora_embedding_*...)."""
    return any(part.startswith("lora_") for part in name.split("."))


class MergedWeights:
    """The merged weights of a peft model under the base model's names.

    `named_parameters()` lists what is published (base names, a tied tensor
    once, in the order of the plain model's `named_parameters`), `fill(views)`
    writes the current merged weights into the publisher's buffer views
    (cast to their dtype), `state_dict()` is the merged state in the master
    dtype (checkpoints).

    Raises:
        ValueError: when a target module's weight is tied to another tensor
            (merging would untie it; the layout lists a tied tensor once).
    """

    def __init__(self, peft_model: torch.nn.Module):
        from peft.tuners.lora import LoraLayer

        self.peft_model = peft_model
        self.base = peft_model.get_base_model()
        self.adapter = peft_model.active_adapter
        layers = {f"{name}.base_layer.weight": module for name, module in self.base.named_modules()
                  if isinstance(module, LoraLayer)}
        self.entries: list[tuple[str, torch.Tensor, Any]] = [
            (_base_name(name), p, layers.get(name))
            for name, p in self.base.named_parameters() if not _is_adapter(name)]
        listed = {name for name, _ in self.base.named_parameters()}
        tied = sorted(set(layers) - listed)
        if tied:
            raise ValueError(f"learner.lora_target_modules: {_base_name(tied[0])!r} is tied to "
                             "another weight (e.g. lm_head to the embedding); leave that "
                             "module out of the targets")

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(published name, master tensor of the same shape) for each published tensor."""
        for name, p, _ in self.entries:
            yield name, p

    def merged(self, tensor: torch.Tensor, layer: Any) -> torch.Tensor:
        """W + (alpha / r) B A for a target's base weight (`tensor` itself elsewhere)."""
        if layer is None:
            return tensor.detach()
        return tensor.detach() + layer.get_delta_weight(self.adapter).detach()

    def fill(self, views: list[torch.Tensor]) -> None:
        """Write the merged weights into `views` (in `named_parameters` order), one
        merged tensor alive at a time."""
        with torch.no_grad():
            for view, (_, p, layer) in zip(views, self.entries, strict=True):
                view.copy_(self.merged(p, layer))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The merged model's state under the base names (tied tensors shared), in the
        master dtype: what `merge_and_unload().state_dict()` holds."""
        with torch.no_grad():
            merged = {id(p): self.merged(p, layer) for _, p, layer in self.entries
                      if layer is not None}
            return {_base_name(name): merged.get(id(t), t.detach())
                    for name, t in self.base.state_dict(keep_vars=True).items()
                    if not _is_adapter(name)}


def _base_name(name: str) -> str:
    """A parameter's name in the plain model: peft's `X.base_layer.weight` is `X.weight`."""
    return name.replace(".base_layer.", ".")


# ---------------------------------------------------------------- checkpoints


def adapter_state(peft_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights, as peft saves them (keys without the adapter name)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach() for k, v in get_peft_model_state_dict(peft_model).items()}


def save_adapter(directory: Path, state: dict[str, torch.Tensor], peft_model: torch.nn.Module,
                 base_dir: str) -> None:
    """Write a peft adapter directory: adapter_config.json and adapter_model.safetensors."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    config = peft_model.peft_config[peft_model.active_adapter]
    config.base_model_name_or_path = base_dir
    config.save_pretrained(str(directory))
    save_file({k: v.contiguous() for k, v in state.items()},
              str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})


def adapter_settings(directory: Path) -> dict[str, Any]:
    """The structural settings of a saved adapter, under the config's names."""
    saved = json.loads((directory / "adapter_config.json").read_text())
    out = {dotted: saved.get(key) for key, dotted in STRUCTURAL.items()}
    out["learner.lora_target_modules"] = sorted(out["learner.lora_target_modules"] or [])
    return out


def refuse_adapters(path: Path) -> None:
    """Refuse to resume a LoRA checkpoint without `learner.lora` (its optimizer
    state is the adapters')."""
    if (Path(path) / ADAPTER_DIR).is_dir():
        raise ValueError(f"{path} holds LoRA adapters: resume with learner.lora = true, or "
                         f"start a new run from its merged weights with model.path = "
                         f"{str(path)!r}")


def load_adapter(peft_model: torch.nn.Module, directory: Path, learner: Any) -> None:
    """Load a checkpoint's adapter weights into `peft_model`.

    Raises:
        ValueError: when the checkpoint has no adapter, or its rank, alpha or
            targets differ from the config's.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if not (directory / "adapter_config.json").is_file():
        raise ValueError(f"{directory.parent} has no LoRA adapter (it was written with "
                         "learner.lora = false): resume with learner.lora = false, or start "
                         f"a new LoRA run from it with model.path = {str(directory.parent)!r}")
    want = {"learner.lora_rank": learner.lora_rank, "learner.lora_alpha": learner.lora_alpha,
            "learner.lora_target_modules": sorted(learner.lora_target_modules)}
    have = adapter_settings(directory)
    for name, value in want.items():
        if have[name] != value:
            raise ValueError(f"--resume: {name} = {value!r} but the checkpoint's adapters were "
                             f"trained with {have[name]!r}; resume with the same value")
    state = load_file(str(directory / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(peft_model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"{directory}: adapter tensors the model has no place for, e.g. "
                         f"{unexpected[0]!r}")
