"""Tests for the transformers engine: exact log-probs, seeding, EOS, weight loading."""

import pytest
import torch

from rapid_async.engines.base import GenerateRequest
from rapid_async.engines.hf import HFEngine
from rapid_async.tinymodel import build_tokenizer

TEXTS = ["1+2=", "12+34=", "99-7=", "5*5=", "123*45="]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model_dir(random_model_dir):
    return random_model_dir


@pytest.fixture(scope="module")
def prompts():
    tokenizer = build_tokenizer()
    return [tokenizer(text)["input_ids"] for text in TEXTS]


@pytest.fixture()
def engine(model_dir):
    return HFEngine(model_dir, seed=0)


def teacher_forced(model, prompt, tokens, temperature):
    """log_softmax(logits / T) of one unpadded sequence at `tokens`, (len(tokens),)."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float()  # (T, V)
    scale = temperature if temperature > 0 else 1.0
    logprobs = torch.log_softmax(logits / scale, dim=-1)
    return logprobs.gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1), logits


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_teacher_forcing(engine, prompts, temperature):
    request = GenerateRequest(prompts=prompts, n=4, temperature=temperature, max_new_tokens=10,
                              seed=1)
    groups = engine.generate(request)
    assert len(groups) == len(prompts) and all(len(g) == 4 for g in groups)
    compared = 0
    for prompt, group in zip(prompts, groups):
        for completion in group:
            assert len(completion.logprobs) == len(completion.token_ids) > 0
            expected, _ = teacher_forced(engine.model, prompt, completion.token_ids, temperature)
            torch.testing.assert_close(torch.tensor(completion.logprobs), expected,
                                       atol=1e-5, rtol=0)
            compared += len(completion.token_ids)
    assert compared > 50


def test_temperature_changes_logprobs(engine, prompts):
    """The same tokens scored at T=0.7 and T=1 differ: temperature really is applied."""
    completion = engine.generate(GenerateRequest(prompts=prompts[:1], n=1, temperature=0.7,
                                                 max_new_tokens=6, seed=2))[0][0]
    at_one, _ = teacher_forced(engine.model, prompts[0], completion.token_ids, 1.0)
    assert (torch.tensor(completion.logprobs) - at_one).abs().max() > 1e-3


def test_greedy_is_argmax_and_batch_independent(engine, prompts):
    request = GenerateRequest(prompts=prompts, n=2, temperature=0.0, max_new_tokens=8)
    batched = engine.generate(request)
    for prompt, group in zip(prompts, batched):
        assert group[0].token_ids == group[1].token_ids
        expected, logits = teacher_forced(engine.model, prompt, group[0].token_ids, 0.0)
        assert logits.argmax(-1).tolist() == group[0].token_ids
        torch.testing.assert_close(torch.tensor(group[0].logprobs), expected, atol=1e-5, rtol=0)
        alone = engine.generate(GenerateRequest(prompts=[prompt], n=1, temperature=0.0,
                                                max_new_tokens=8))
        assert alone[0][0].token_ids == group[0].token_ids


def test_seeded_sampling_is_reproducible(model_dir, engine, prompts):
    request = GenerateRequest(prompts=prompts, n=3, temperature=1.0, max_new_tokens=8, seed=5)
    first, second = engine.generate(request), engine.generate(request)
    assert first == second
    request.seed = 6
    assert engine.generate(request) != first
    # without a request seed, the engine's own stream: same engine seed, same samples
    unseeded = GenerateRequest(prompts=prompts, n=3, temperature=1.0, max_new_tokens=8)
    a, b = HFEngine(model_dir, seed=3), HFEngine(model_dir, seed=3)
    assert a.generate(unseeded) == b.generate(unseeded)
    assert a.generate(unseeded) != a.generate(unseeded)  # the stream advances


def test_eos_stops_and_length_caps(engine, prompts):
    eos = engine.model.config.eos_token_id
    groups = engine.generate(GenerateRequest(prompts=prompts, n=16, temperature=1.0,
                                             max_new_tokens=12, seed=0))
    reasons = {"stop": 0, "length": 0}
    for group in groups:
        for completion in group:
            reasons[completion.finish_reason] += 1
            assert eos not in completion.token_ids[:-1]
            if completion.finish_reason == "stop":
                assert completion.token_ids[-1] == eos
            else:
                assert len(completion.token_ids) == 12 and completion.token_ids[-1] != eos
    assert reasons["stop"] > 0 and reasons["length"] > 0


def _perturbed_state(engine):
    """All parameters plus N(0, 0.05) noise, fp32, without the tied lm_head."""
    generator = torch.Generator().manual_seed(11)
    return {name: p.detach().clone() + 0.05 * torch.randn(p.shape, generator=generator)
            for name, p in engine.model.named_parameters()}


def test_load_weights_changes_outputs_like_a_fresh_engine(engine, prompts, tmp_path):
    request = GenerateRequest(prompts=prompts, n=4, temperature=1.0, max_new_tokens=8, seed=9)
    before = engine.generate(request)
    state = _perturbed_state(engine)
    engine.load_weights(state)
    after = engine.generate(request)
    assert after != before
    for name, parameter in engine.model.named_parameters():
        assert torch.equal(parameter, state[name]), name
    engine.model.save_pretrained(tmp_path / "m")
    fresh = HFEngine(tmp_path / "m", seed=0)
    assert fresh.generate(request) == after
    # the tied head follows the embedding
    assert torch.equal(engine.model.lm_head.weight, state["model.embed_tokens.weight"])


def test_load_weights_accepts_tied_head(engine):
    state = _perturbed_state(engine)
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    engine.load_weights(state)
    state["lm_head.weight"] = state["lm_head.weight"] + 1.0
    with pytest.raises(ValueError, match="lm_head.weight.*tied"):
        engine.load_weights(state)


@pytest.mark.parametrize("problem", ["shape", "unknown", "dtype", "missing", "not_tensor"])
def test_load_weights_rejects_bad_tensors(engine, problem):
    state = _perturbed_state(engine)
    name = "model.layers.1.mlp.up_proj.weight"
    if problem == "shape":
        state[name] = state[name][:-1]
        match = f"{name}.*shape"
    elif problem == "unknown":
        name = "model.layers.9.mlp.up_proj.weight"
        state[name] = torch.zeros(3)
        match = f"unknown tensor '{name}'"
    elif problem == "dtype":
        state[name] = state[name].to(torch.bfloat16)
        match = f"{name}.*dtype"
    elif problem == "missing":
        del state[name]
        match = f"missing.*{name}"
    else:
        state[name] = state[name].tolist()
        match = f"{name}.*not a tensor"
    before = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    with pytest.raises(ValueError, match=match):
        engine.load_weights(state)
    for n, p in engine.model.named_parameters():  # nothing was copied
        assert torch.equal(p, before[n]), n


@pytest.mark.parametrize(
    "kwargs,field",
    [({"n": 0}, "n must"), ({"temperature": -1.0}, "temperature"),
     ({"max_new_tokens": 0}, "max_new_tokens"), ({"prompts": [[]]}, r"prompts\[0\]"),
     ({"prompts": [[1, 999]]}, r"prompts\[0\]")],
)
def test_bad_requests(engine, kwargs, field):
    request = GenerateRequest(**{"prompts": [[1, 5]], "n": 1, **kwargs})
    with pytest.raises(ValueError, match=field):
        engine.generate(request)


def test_bad_dtype(model_dir):
    with pytest.raises(ValueError, match="dtype"):
        HFEngine(model_dir, dtype="float8")


def test_bfloat16_engine_runs(model_dir, prompts):
    engine = HFEngine(model_dir, dtype="bfloat16")
    assert next(engine.model.parameters()).dtype == torch.bfloat16
    groups = engine.generate(GenerateRequest(prompts=prompts, n=2, max_new_tokens=4, seed=0))
    assert all(len(c.token_ids) == len(c.logprobs) for g in groups for c in g)
    assert all(lp <= 0.0 for g in groups for c in g for lp in c.logprobs)


def test_stop_strings_end_completions_at_the_completing_token(random_model_dir):
    """Sampling from a random model: every completion that contains a stop
    string ends right after its first occurrence, with finish_reason "stop"."""
    from transformers import AutoTokenizer

    from rapid_async.engines.base import stop_length

    tok = AutoTokenizer.from_pretrained(random_model_dir)
    engine = HFEngine(random_model_dir, seed=0)
    stops = ("5", "12")
    groups = engine.generate(GenerateRequest(prompts=[tok("3+4=")["input_ids"]], n=32,
                                             temperature=1.0, max_new_tokens=20, seed=1,
                                             stop=stops))
    ended_by_stop = 0
    for c in groups[0]:
        text = tok.decode(c.token_ids)
        if any(s in text for s in stops):
            ended_by_stop += 1
            assert c.finish_reason == "stop" and text.endswith(("5", "12")), text
            assert not any(s in tok.decode(c.token_ids[:-1]) for s in stops), text
        assert stop_length(c.token_ids, tok.decode, stops) in (None, len(c.token_ids))
    assert ended_by_stop >= 5  # a random 32-token vocabulary hits "5" often
    assert stop_length([4, 5, 9, 9], lambda ids: "".join(map(str, ids)), ("59",)) == 3


# ---------------------------------------------------------------- in-flight weight updates

def _switching_hook(engine, state, at_step):
    """A step hook that loads `state` into `engine` before decode step `at_step`
    (label 0 before, 1 after), counting its calls."""
    calls = {"n": 0}

    def hook():
        calls["n"] += 1  # call 1 is before the prefill (step 0), call s + 1 before step s
        if calls["n"] == at_step + 1:
            engine.load_weights(state)
        return 0 if calls["n"] <= at_step else 1

    return hook, calls


@pytest.mark.parametrize("recompute", [False, True])
def test_an_update_mid_sequence_records_two_versions_and_exact_logprobs(model_dir, prompts,
                                                                        recompute):
    """Tokens before the update are scored under the old weights; after it, under
    the new ones on top of the old KV cache (kept) or on a fresh prefill (recompute)."""
    engine, old, new = HFEngine(model_dir, seed=0), HFEngine(model_dir), HFEngine(model_dir)
    state = _perturbed_state(engine)
    new.load_weights(state)
    s = 4
    hook, calls = _switching_hook(engine, state, at_step=s)
    groups = engine.generate(GenerateRequest(prompts=prompts, n=3, temperature=1.0,
                                             max_new_tokens=10, seed=3, step_hook=hook,
                                             recompute=recompute))
    assert calls["n"] >= s + 1
    mixed = 0
    for prompt, group in zip(prompts, groups):
        for c in group:
            assert c.versions == [0 if i < s else 1 for i in range(len(c.token_ids))]
            y = c.token_ids
            seg1, _ = teacher_forced(old.model, prompt, y[:s], 1.0)
            torch.testing.assert_close(torch.tensor(c.logprobs[:s]), seg1, atol=1e-4, rtol=0)
            if len(y) <= s:
                continue
            mixed += 1
            with torch.no_grad():
                if recompute:
                    logits = new.model(torch.tensor([prompt + y])).logits[0, len(prompt) - 1:-1]
                    logits = logits[s:]
                else:  # KV of prompt + y[:s-1] from the old weights, the rest from the new
                    past = old.model(torch.tensor([prompt + y[:s - 1]]),
                                     use_cache=True).past_key_values
                    logits = new.model(torch.tensor([y[s - 1:-1]]), past_key_values=past,
                                       use_cache=True).logits[0]
            seg2 = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(y[s:])[:, None])
            torch.testing.assert_close(torch.tensor(c.logprobs[s:]), seg2.squeeze(-1),
                                       atol=1e-4, rtol=0)
            # and they are not what the other mode would have given
            pure_new, _ = teacher_forced(new.model, prompt, y, 1.0)
            if not recompute:
                assert not torch.allclose(torch.tensor(c.logprobs[s:]), pure_new[s:], atol=1e-4)
    assert mixed >= 5


def test_without_a_hook_completions_carry_no_versions(engine, prompts):
    groups = engine.generate(GenerateRequest(prompts=prompts[:1], n=2, max_new_tokens=4, seed=1))
    assert all(c.versions is None for c in groups[0])


# ---------------------------------------------------------------- continuous batching

def test_continuous_batching_returns_every_completion_once_and_matches_greedy(engine, prompts):
    """5 prompts x 2 rows through 3 slots: each finished row's slot takes the
    next waiting one; greedy completions equal those of each prompt alone."""
    eos = min(engine.eos_token_ids)
    request = GenerateRequest(prompts=prompts, n=2, temperature=0.0, max_new_tokens=9,
                              max_batch=3)
    groups = engine.generate(request)
    assert [len(g) for g in groups] == [2] * len(prompts)
    for prompt, group in zip(prompts, groups):
        alone = engine.generate(GenerateRequest(prompts=[prompt], n=1, temperature=0.0,
                                                max_new_tokens=9))[0][0]
        for c in group:
            assert c.token_ids == alone.token_ids
            assert c.finish_reason == alone.finish_reason
            torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(alone.logprobs),
                                       atol=1e-4, rtol=0)
    assert all(c.token_ids[-1] == eos or len(c.token_ids) == 9 for g in groups for c in g)


@pytest.mark.parametrize("recompute", [False, True])
def test_continuous_batching_logprobs_are_exact_with_and_without_an_update(model_dir, prompts,
                                                                           recompute):
    """Sampled rows through 4 slots, stop strings cutting some short so that
    slots refill mid-run: every log-prob equals teacher forcing under the
    weights of its label (recompute: all of a row's context under the new ones)."""
    engine, old, new = HFEngine(model_dir, seed=0), HFEngine(model_dir), HFEngine(model_dir)
    state = _perturbed_state(engine)
    new.load_weights(state)
    s = 5
    hook, _ = _switching_hook(engine, state, at_step=s)
    tokenizer = build_tokenizer()
    stops = tuple(tokenizer.convert_ids_to_tokens(list(range(5, 9))))
    request = GenerateRequest(prompts=prompts, n=3, temperature=1.0, max_new_tokens=10,
                              seed=4, step_hook=hook, recompute=recompute, max_batch=4,
                              stop=stops)
    engine.tokenizer = tokenizer
    groups = engine.generate(request)
    assert [len(g) for g in groups] == [3] * len(prompts)
    lengths = [len(c.token_ids) for g in groups for c in g]
    assert min(lengths) < 10 and max(lengths) == 10, lengths  # rows ended early: slots refilled
    checked = {0: 0, 1: 0}
    for prompt, group in zip(prompts, groups):
        for c in group:
            assert c.versions == sorted(c.versions)
            y, versions = c.token_ids, torch.tensor(c.versions)
            old_lp, _ = teacher_forced(old.model, prompt, y, 1.0)
            new_lp, _ = teacher_forced(new.model, prompt, y, 1.0)
            got = torch.tensor(c.logprobs)
            at0 = versions == 0
            torch.testing.assert_close(got[at0], old_lp[at0], atol=1e-4, rtol=0)
            checked[0] += int(at0.sum())
            if recompute or bool(at0.all()) or not bool(at0.any()):
                # rows begun after the update (and recompute) are pure new weights
                torch.testing.assert_close(got[~at0], new_lp[~at0], atol=1e-4, rtol=0)
                checked[1] += int((~at0).sum())
    assert checked[0] > 10 and checked[1] > 10, checked
