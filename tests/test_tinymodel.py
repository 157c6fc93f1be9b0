"""Tests for the tiny character model: tokenizer, model dir, supervised warm start, cache."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from rapid_async import tinymodel
from rapid_async.engines.hf import HFEngine
from rapid_async.evaluate import EvalSettings, evaluate, run_evaluation
from rapid_async.supervised import encode_examples, train_supervised
from rapid_async.tasks.arithmetic import ArithmeticTask
from rapid_async.tinymodel import (
    build_config,
    build_model,
    build_tokenizer,
    ensure_warm_model,
    warm_start,
)

SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 2}
TEXTS = ["12+34=46", "99-7=92", "5*5=25", "-3", "(1.5)/2, 7 = 7", ""]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model_dir(random_model_dir):
    return random_model_dir


def test_tokenizer_round_trip():
    tokenizer = build_tokenizer()
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert len(ids) == len(text) + 1  # one token per character
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        assert tokenizer.decode(ids + [tokenizer.eos_token_id], skip_special_tokens=True) == text
    assert len(tokenizer) == 24 <= tinymodel.VOCAB_SIZE
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.convert_ids_to_tokens(tokenizer("1+2")["input_ids"]) == ["<bos>", "1", "+", "2"]


def test_model_dir_loads_with_auto_classes(model_dir):
    for name in ["config.json", "generation_config.json", "model.safetensors",
                 "tokenizer.json", "tokenizer_config.json"]:
        assert (model_dir / name).is_file(), name
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    reference = build_tokenizer()
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == reference(text)["input_ids"]
        assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.model_type == "qwen2" and model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["pad_token_id"]) == (2, 0)
    stored = load_file(model_dir / "model.safetensors")
    assert "lm_head.weight" not in stored
    for name, parameter in model.named_parameters():
        assert torch.equal(stored[name], parameter), name


def test_parameter_count():
    model = build_model(seed=0)
    # embeddings 32*128; per layer: q,k,v,o 4*128*128 + q,k,v biases 3*128,
    # mlp 3*128*512, two norms 2*128; final norm 128
    per_layer = 4 * 128 * 128 + 3 * 128 + 3 * 128 * 512 + 2 * 128
    assert sum(p.numel() for p in model.parameters()) == 32 * 128 + 4 * per_layer + 128 == 1_055_360


def test_init_is_deterministic_by_seed():
    a, b, c = build_model(seed=0, **SMALL), build_model(seed=0, **SMALL), build_model(seed=1, **SMALL)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_bad_size_option():
    with pytest.raises(ValueError, match="hidden_sise"):
        build_config(hidden_sise=3)
    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        build_config(hidden_size=65)


def test_encode_examples_masks_prompt_and_padding():
    tokenizer = build_tokenizer()
    task = ArithmeticTask()
    problems = [task.train_problem(0), task.train_problem(1)]
    batch = encode_examples(tokenizer, problems, eos_id=2)
    for row, problem in enumerate(problems):
        ids, labels, mask = (batch[k][row] for k in ("input_ids", "labels", "attention_mask"))
        n = int(mask.sum())
        text = tokenizer.decode(ids[:n], skip_special_tokens=True)
        assert text == problem.prompt + problem.answer and ids[n - 1] == 2
        kept = labels[labels != -100].tolist()
        assert kept == tokenizer(problem.answer, add_special_tokens=False)["input_ids"] + [2]
        assert (labels[n:] == -100).all() and (ids[n:] == tokenizer.pad_token_id).all()


def test_few_training_steps_reduce_loss():
    torch.manual_seed(0)
    model = build_model(seed=0, **SMALL)
    losses = train_supervised(model, build_tokenizer(), ArithmeticTask(), steps=40,
                              batch_size=32, lr=3e-3)
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < losses[0] - 0.8  # starts near ln(32) = 3.47


def test_a_check_stops_training_and_the_schedule_does_not_depend_on_it():
    from rapid_async.supervised import lr_factor

    def run(check=None):
        torch.manual_seed(0)
        model = build_model(seed=0, **SMALL)
        return train_supervised(model, build_tokenizer(), ArithmeticTask(), steps=12,
                                batch_size=8, lr=3e-3, decay_steps=8, check=check,
                                check_every=3)

    seen = []
    stopped = run(lambda step: seen.append(step) or step >= 6)
    assert seen == [3, 6] and len(stopped) == 6
    assert stopped == run()[:6]  # the first 6 steps are those of the full run
    assert [round(lr_factor(s, 12, 8), 4) for s in (0, 8, 11)] == [1.0, 0.1, 0.1]
    assert lr_factor(5, 1500) == pytest.approx(6 / 75)  # the old schedule, unchanged


def test_warm_start_writes_report_and_is_deterministic(tmp_path):
    recipe = {"steps": 6, "batch_size": 16, "lr": 3e-3, "check_every": 3, "check_n": 10,
              "target": 0.9}
    kwargs = {"seed": 3, "eval_n": 10, "log": None, "threads": 1, "recipe": recipe}
    a = warm_start(tmp_path / "a", **kwargs, **SMALL)
    b = warm_start(tmp_path / "b", **kwargs, **SMALL)
    report = json.loads((a / "warm_start.json").read_text())
    assert report["settings"]["steps"] == 6 and report["settings"]["seed"] == 3
    assert report["settings"]["target"] == 0.9 and report["settings"]["version"] >= 4
    # 6 steps cannot reach 90%: both checks are recorded, all steps taken, not reached
    assert [step for step, _ in report["checks"]] == [3, 6] and report["steps_taken"] == 6
    assert report["target_reached"] is False and "cpu" in report
    assert 0.0 <= report["heldout_greedy_success"] <= 1.0
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert AutoModelForCausalLM.from_pretrained(a).config.hidden_size == 64


def test_a_bad_warm_start_setting_is_named():
    with pytest.raises(ValueError, match="unknown warm-start setting.*'stpes'"):
        warm_start("/nonexistent", recipe={"stpes": 3})
    with pytest.raises(ValueError, match="target"):
        warm_start("/nonexistent", recipe={"target": 1.5})


def test_ensure_warm_model_caches_by_settings(tmp_path):
    lines = []
    kwargs = {"eval_n": 0, "log": lines.append, "threads": 1, **SMALL}
    recipe = {"steps": 3, "batch_size": 8, "target": None}
    first = ensure_warm_model(tmp_path, recipe=recipe, **kwargs)
    built = len(lines)
    assert built > 0 and first.parent == tmp_path
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert ensure_warm_model(tmp_path, recipe=recipe, **kwargs) == first
    assert len(lines) == built and (first / "model.safetensors").stat().st_mtime_ns == stamp
    other = ensure_warm_model(tmp_path, seed=1, recipe=recipe, **kwargs)
    assert other != first
    # the recipe's target is part of the key
    targeted = ensure_warm_model(tmp_path, recipe={**recipe, "target": 0.5, "check_every": 3},
                                 **kwargs)
    assert targeted not in (first, other)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [first.name, other.name, targeted.name])


def test_the_default_warm_model_ships_with_the_package(tmp_path):
    """A fresh clone finds the default warm start in rapid_async/assets, built by
    the current recipe (a recipe change without `tinymodel ship-warm` fails here)."""
    from rapid_async import warmstart as ws
    from rapid_async.warmstart import SHIPPED_DIR

    lines = []
    path = ensure_warm_model(tmp_path / "empty-cache", log=lines.append)
    assert path.parent == SHIPPED_DIR and lines == []  # found, nothing built
    report = json.loads((path / "warm_start.json").read_text())
    assert report["settings"] == ws._settings(ArithmeticTask(), 0, ws._recipe(None), {})
    assert report["target_reached"]
    assert sorted(p.name for p in SHIPPED_DIR.iterdir()) == [path.name]  # no stale models


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("RAPID_CACHE", str(tmp_path))
    assert tinymodel.default_cache_dir() == tmp_path


def test_cli_warmstart(tmp_path):
    from typer.testing import CliRunner

    result = CliRunner().invoke(tinymodel._cli(), ["warmstart", "--out", str(tmp_path / "m"),
                                                   "--steps", "4", "--pass-k", "2",
                                                   "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "step" not in result.output or "loss" in result.output
    assert "held-out greedy success" in result.output and "pass@2" in result.output
    assert (tmp_path / "m" / "model.safetensors").is_file()


@pytest.mark.slow
def test_default_warm_start_lands_in_range():
    """The cached default warm start reached its held-out target, and sampling finds more."""
    path = ensure_warm_model()
    report = json.loads((path / "warm_start.json").read_text())
    target = tinymodel.WARM_START_DEFAULTS["target"]
    assert report["target_reached"] and report["checks"][-1][1] >= target
    assert all(s < target for _, s in report["checks"][:-1])  # it stopped at the first
    engine = HFEngine(path)
    tokenizer, task = build_tokenizer(), ArithmeticTask()
    success = evaluate(engine, tokenizer, task, n=500, max_new_tokens=6)
    assert success == pytest.approx(report["checks"][-1][1], abs=0.01)  # the check, remeasured
    settings = EvalSettings(problems=200, greedy=False, samples=8, max_new_tokens=6)
    sampled = run_evaluation(engine, tokenizer, task, settings).summary
    assert sampled["pass@8"] > success
