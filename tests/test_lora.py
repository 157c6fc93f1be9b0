"""Tests of rapid_async.learner.lora: LoRA adapters on the learner (learner.lora).

Only the adapters train and sit in the optimizer; the KL reference is the base
with the adapters off; what is published is the merged model (peft's
merge_and_unload, cast to the inference dtype), and the real weight receiver
of an hf engine ends bit-equal to it; checkpoints resume bit-exactly.
"""

from __future__ import annotations

import copy

import pytest
import torch

from rapid_async.config import load_config
from rapid_async.engines.hf import HFEngine
from rapid_async.learner import checkpoint, lora
from rapid_async.learner.policy import PolicyLogprobs, collate
from rapid_async.learner.trainer import Trainer
from rapid_async.tinymodel import init_model_dir
from rapid_async.weights import WeightReceiver, digest
from rapid_async.weights.publisher import WeightPublisher
from test_system import MODES, _inference_digest, run_learner_and_actors
from test_trainer import SMALL, two_groups
from test_weights_publisher import Collector

pytestmark = pytest.mark.usefixtures("one_thread")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA = ["learner.lora=true", "learner.lora_rank=4", "learner.lora_alpha=8"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return init_model_dir(tmp_path_factory.mktemp("lora") / "model", seed=0, **SMALL)


def make_cfg(*extra: str):
    return load_config(overrides=["learner.lr=1e-2", "algo.group_size=4", "run.seed=0",
                                  *LORA, *extra])


def adapters(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}


def merged_reference(trainer, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """peft's own merge of a copy of the model, cast: what actors must hold."""
    merged = copy.deepcopy(trainer.model).merge_and_unload()
    return {n: p.detach().to(dtype) for n, p in merged.named_parameters()}


def test_only_adapters_train_and_fill_the_optimizer(model_dir):
    trainer = Trainer(make_cfg(), model_dir)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    layers = SMALL["num_hidden_layers"]
    # one lora_A and one lora_B on each of the 7 projections of each layer
    assert len(trainable) == 2 * len(TARGETS) * layers
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    adapter_numel = sum(p.numel() for p in lora.trainable_parameters(trainer.model))
    # q: A 4x32 + B 32x4 = 256; k, v: KV width = hidden (2 KV heads of 16) -> 256 each;
    # o: 256; gate, up: A 4x32 + B 64x4 = 384; down: A 4x64 + B 32x4 = 384 -> 2176 per layer
    assert adapter_numel == 2176 * layers
    assert sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"]) == adapter_numel
    trainer.update(two_groups())
    state = trainer.optimizer.state_dict()["state"]
    assert len(state) == len(trainable)
    moments = sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for s in state.values())
    assert moments == 2 * adapter_numel  # AdamW's two moments of the adapters, nothing else
    total = sum(p.numel() for p in trainer.model.parameters())
    assert adapter_numel < total / 5


def test_an_update_changes_only_the_adapters_and_publishes_peft_merge(model_dir):
    trainer = Trainer(make_cfg("model.inference_dtype=bfloat16"), model_dir)
    base = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" not in n}
    before = adapters(trainer)
    assert all(not v.any() for n, v in before.items() if ".lora_B." in n)  # B = 0: policy = base
    m = trainer.update(two_groups())
    assert m["guard/skipped"] == 0.0 and trainer.version == 1
    after = adapters(trainer)
    # With B = 0 the gradient of A is B^T (...) = 0: the first step moves only B.
    assert all(torch.equal(after[n], before[n]) != (".lora_B." in n) for n in after)
    trainer.update(two_groups(1))
    after = adapters(trainer)
    assert all(not torch.equal(after[n], before[n]) for n in after)
    for n, p in trainer.model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base[n]), f"frozen weight {n} changed"
    published = trainer.inference_state()  # the merged view cast to bf16
    want = merged_reference(trainer, torch.bfloat16)
    assert set(want) <= set(published) and set(published) - set(want) <= {"lm_head.weight"}
    for n, w in want.items():
        assert published[n].dtype == torch.bfloat16
        assert torch.equal(published[n].view(torch.int16), w.view(torch.int16)), n
    frozen = dict(trainer.published_weights().named_parameters())  # base tensors, base names
    changed = {n for n in want if not torch.equal(published[n], frozen[n].to(torch.bfloat16))}
    assert changed == {f"model.layers.{i}.{part}.{t}.weight" for i in range(2)
                       for part, ts in (("self_attn", TARGETS[:4]), ("mlp", TARGETS[4:]))
                       for t in ts}, "only the target projections change"


def test_reference_is_the_base_model_with_adapters_off(model_dir):
    trainer = Trainer(make_cfg("algo.beta=0.1"), model_dir)
    assert trainer.ref_model is None  # no second copy of the weights
    for _ in range(2):
        trainer.update(two_groups())
    batch = collate(two_groups())
    args = (batch.input_ids, batch.attention_mask, batch.positions, batch.completion_ids, batch.mask)
    fresh = Trainer(load_config(overrides=["algo.group_size=4"]), model_dir).model
    with torch.no_grad():
        base = PolicyLogprobs(fresh, 1.0)(*args)
        ref = trainer.ref_policy(*args)
        policy = trainer.policy(*args)
    assert torch.equal(ref, base)
    assert not torch.allclose(policy, base), "the adapters are back on after the reference pass"


def test_actor_receiver_stays_bit_equal_to_the_merged_weights(model_dir):
    trainer = Trainer(make_cfg("model.inference_dtype=bfloat16"), model_dir)
    got = Collector()
    source = trainer.published_weights()
    publisher = WeightPublisher(source, "bfloat16", got.on_update, got.on_snapshot,
                                fill=source.fill)
    engine = HFEngine(model_dir, dtype="bfloat16")
    receiver = WeightReceiver(engine)
    try:
        publisher.begin(0)
        publisher.request_snapshot()
        for version in (1, 2, 3):
            trainer.update(two_groups())
            publisher.stage(version)
            assert publisher.wait_published(version, timeout=60)
        snapshot = got.snapshots[0]  # of version 0, or of a later one if the thread woke late
        receiver.apply(snapshot)
        for update in got.updates:
            if update.base_version >= snapshot.version:
                receiver.apply(update)
        receiver.commit()
    finally:
        publisher.close()
    assert [(u.base_version, u.version) for u in got.updates] == [(0, 1), (1, 2), (2, 3)]
    assert receiver.version == 3
    want = merged_reference(trainer, torch.bfloat16)
    for name, p in engine.model.named_parameters():
        assert torch.equal(p.detach().view(torch.int16), want[name].view(torch.int16)), name
    assert receiver.state_digest == digest.state_digest(
        publisher.layout, publisher.published_digests)
    assert receiver.buffer_digest() == receiver.state_digest


def test_lora_settings_are_checked_with_the_field_named(model_dir):
    for override, field in [("learner.lora_rank=0", "learner.lora_rank"),
                            ("learner.lora_alpha=-1", "learner.lora_alpha"),
                            ("learner.lora_dropout=1.0", "learner.lora_dropout"),
                            ("learner.lora_target_modules=[]", "learner.lora_target_modules"),
                            ("learner.devices=2", "learner.devices = 1"),
                            ("learner.lora_ranks=4", "unknown field learner.lora_ranks")]:
        with pytest.raises(ValueError, match=field):
            make_cfg(override)
    with pytest.raises(ValueError, match="learner.lora_target_modules"):
        Trainer(make_cfg('learner.lora_target_modules=["qq_proj"]'), model_dir)
    with pytest.raises(ValueError, match="tied"):  # the tiny model ties lm_head to the embedding
        Trainer(make_cfg('learner.lora_target_modules=["lm_head"]'), model_dir)


def test_resume_continues_bit_exactly(model_dir, tmp_path):
    cfg = make_cfg("algo.beta=0.05")
    first = Trainer(cfg, model_dir)
    for _ in range(2):
        first.update(two_groups())
    path = checkpoint.write(checkpoint.capture(first, []), tmp_path, first.hf_model,
                            first.tokenizer)
    assert (path / "adapter" / "adapter_model.safetensors").is_file()
    for version in (3, 4):
        first.update(two_groups(version - 1))
    resumed = Trainer(cfg, model_dir)
    checkpoint.load(resumed, path)
    assert resumed.version == 2
    for version in (3, 4):
        resumed.update(two_groups(version - 1))
    a, b = adapters(first), adapters(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)
    sa, sb = first.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    # The checkpoint's model weights are the merged ones (a plain HF model directory).
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(path).state_dict()
    ckpt_trainer = Trainer(cfg, model_dir)
    checkpoint.load(ckpt_trainer, path)
    want = merged_reference(ckpt_trainer)
    assert all(torch.equal(saved[n], w) for n, w in want.items())


def test_resume_refuses_other_adapter_shapes_and_mixed_checkpoints(model_dir, tmp_path):
    trainer = Trainer(make_cfg(), model_dir)
    path = checkpoint.write(checkpoint.capture(trainer, []), tmp_path / "lora",
                            trainer.hf_model, trainer.tokenizer)
    with pytest.raises(ValueError, match="learner.lora_rank = 8"):
        checkpoint.load(Trainer(make_cfg("learner.lora_rank=8"), model_dir), path)
    plain = Trainer(load_config(overrides=["algo.group_size=4"]), model_dir)
    with pytest.raises(ValueError, match="learner.lora = true"):
        checkpoint.load(plain, path)
    full = checkpoint.write(checkpoint.capture(plain, []), tmp_path / "full", plain.model,
                            plain.tokenizer)
    with pytest.raises(ValueError, match="no LoRA adapter"):
        checkpoint.load(Trainer(make_cfg(), model_dir), full)


SLOW = pytest.mark.slow


@pytest.mark.parametrize("mode,engine", [
    ("rapid-async", "hf"), pytest.param("rapid-sync", "hf", marks=SLOW),
    pytest.param("grpo", "hf", marks=SLOW),  # algo.beta > 0: the reference is the base
    # full: the same merged deltas reach a vLLM actor as an hf one (bin/test-full)
    pytest.param("rapid-async", "vllm", marks=[SLOW, pytest.mark.vllm, pytest.mark.full])])
def test_lora_runs_end_to_end_and_actors_hold_the_merged_weights(mode, engine, tmp_path,
                                                                  random_model_dir):
    """Real learner and actor processes: the actor's final weights (its digest) are
    the checkpoint's merged weights cast to the inference dtype."""
    if engine == "vllm":
        pytest.importorskip("vllm")
    steps = 6
    overrides = MODES[mode] + LORA + [f"run.max_steps={steps}", "run.eval_every=0",
                                      "run.eval_size=20", "algo.group_size=4",
                                      "algo.max_new_tokens=4", "learner.lr=1e-2",
                                      f"actor.engine={engine}"]
    records, logs = run_learner_and_actors(tmp_path, random_model_dir, overrides,
                                           timeout=600 if engine == "vllm" else 300)
    learner = [r for r in records if r["role"] == "learner" and "loss/policy" in r]
    assert [r["version"] for r in learner] == list(range(1, steps + 1))
    actor = [r for r in records if r["role"] == "actor"]
    assert actor[-1]["actor/deltas"] >= 1 and max(r["version"] for r in actor) == steps
    ckpt = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    assert ckpt.name.endswith(f"{steps:08d}") and (ckpt / "adapter").is_dir()
    assert actor[-1]["weights/state_digest"] == _inference_digest(ckpt, "float32")
    mism = [r["mismatch/engine_abs_delta"] for r in learner if "mismatch/engine_abs_delta" in r]
    # the engine runs the merged weights the learner trains (vLLM: its own kernels, ~1e-6)
    assert mism and max(mism) < (1e-3 if engine == "vllm" else 1e-4), mism
    assert "Traceback" not in logs
