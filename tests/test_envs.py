"""Environments: token in, token out across turns, loss masks on the wire and in the loss."""

from __future__ import annotations

import math

import pytest
import torch

from rapid_async.engines.hf import HFEngine
from rapid_async.envs import EpisodeLimits, EpisodeRunner, SingleTurnEnv, StepResult
from rapid_async.envs.render import Renderer
from rapid_async.envs.retry import RetryEnv
from rapid_async.envs.rollout import EpisodePrompts, pack_episodes
from rapid_async.learner.policy import collate, token_logprobs
from rapid_async.loss import LossSettings, compute_loss
from rapid_async.tasks.arithmetic import ArithmeticTask
from rapid_async.tasks.prompts import PromptSettings, encode_prompt
from rapid_async.wire.protocol import ProtocolError, decode, encode

QWEN_LIKE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
             "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class RecordingEngine(HFEngine):
    """The real hf engine, keeping every request's prompts and every sampled turn."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[list[list[int]], list]] = []

    def generate(self, request):
        out = super().generate(request)
        self.calls.append(([list(p) for p in request.prompts], [c for (c,) in out]))
        return out


@pytest.fixture(scope="module")
def chat_setup(chat_model_dir):
    from transformers import AutoTokenizer

    return RecordingEngine(chat_model_dir, seed=0), AutoTokenizer.from_pretrained(chat_model_dir)


def _runner(engine, tokenizer, fmt="chat", turns=3, cap=40, concurrency=0):
    task = ArithmeticTask()
    return task, EpisodeRunner(engine, tokenizer, lambda: RetryEnv(task, feedback="{prompt}"),
                               PromptSettings(fmt), EpisodeLimits(turns, cap, 6), concurrency)


def test_trained_ids_equal_generated_ids_across_turns(chat_setup, one_thread):
    """Every model turn's ids are exactly what the engine sampled, every turn's
    context is the previous ids unchanged, and the learner's batch trains on them."""
    engine, tok = chat_setup
    engine.calls.clear()
    check_token_in_token_out(engine, tok, engine.model, 1e-4)


def check_token_in_token_out(engine, tok, learner_model, tolerance, concurrency=0):
    """Play 3-turn retry episodes on `engine` (with a `calls` record) and check them
    against what it sampled, through the wire format and the learner's batch."""
    task, runner = _runner(engine, tok, concurrency=concurrency)
    problems = [task.train_problem(i) for i in range(3)]
    played = runner.run(problems, 2, 1.0, seed=1)
    sampled: dict[tuple, list] = {}  # context -> what the engine sampled for it
    for prompts, comps in engine.calls:
        for p, c in zip(prompts, comps):
            sampled.setdefault(tuple(p), []).append(c)
    multi = 0
    for eps in played:
        for ep in eps:
            assert ep.prompt == encode_prompt(tok, ep.problem.prompt, PromptSettings("chat"))
            # walk the episode: model segments must be the engine's samples for that context
            pos, turns = 0, 0
            while pos < len(ep.ids):
                rest = ep.ids[pos:]
                found = [c for c in sampled[tuple(ep.prompt + ep.ids[:pos])]
                         if rest[:len(c.token_ids)] == c.token_ids[:len(rest)]]
                assert found, "a model turn that the engine did not sample"
                comp = found[0]
                n = min(len(comp.token_ids), len(rest))
                assert all(m == 1 for m in ep.mask[pos:pos + n])
                assert ep.logprobs[pos:pos + n] == pytest.approx(comp.logprobs[:n], abs=0)
                pos += n
                turns += 1
                env = 0
                while pos + env < len(ep.ids) and ep.mask[pos + env] == 0:
                    assert ep.logprobs[pos + env] == 0.0
                    env += 1
                if env:  # the env turn is the rendered feedback, never re-tokenized model text
                    expected = runner.renderer.env_turn(
                        [{"role": "user", "content": ep.problem.prompt}], ep.ids[pos - 1])
                    assert ep.ids[pos:pos + env] == expected
                pos += env
            assert turns == ep.turns
            multi += ep.turns > 1
    assert multi > 0  # the random model is always wrong: episodes go on to 3 turns
    groups = [pack_episodes("a", str(i), 0, eps, 0.1) for i, eps in enumerate(played)]
    groups = [decode(encode(g)) for g in groups]  # through the wire format
    batch = collate(groups)
    for r, ep in enumerate(ep for eps in played for ep in eps):
        n = len(ep.prompt) + len(ep.ids)
        assert batch.input_ids[r, :n].tolist() == ep.prompt + ep.ids
        c = len(ep.ids)
        assert batch.mask[r, :c].tolist() == [float(m) for m in ep.mask]
        assert batch.completion_ids[r, :c].tolist() == ep.ids
    # Same weights on the learner: its log-probs at the model tokens are the engine's.
    with torch.no_grad():
        lp = token_logprobs(learner_model, batch, 1.0)
    model = batch.mask.bool()
    assert (lp[model] - batch.behaviour_logprobs[model]).abs().max() < tolerance
    assert (lp[~model] == 0).all()


def test_single_turn_env_is_todays_task(chat_setup, one_thread):
    """One turn: the prompt is encode_prompt's, the reward the verifier's, no loss mask."""
    engine, tok = chat_setup
    task = ArithmeticTask()
    runner = EpisodeRunner(engine, tok, lambda: SingleTurnEnv(task), PromptSettings("plain"),
                           EpisodeLimits(1, 6, 6))
    problems = [task.train_problem(i) for i in range(4)]
    played = runner.run(problems, 3, 1.0, seed=2)
    for p, eps in zip(problems, played):
        group = pack_episodes("a", "0", 0, eps, 0.0)
        assert group.loss_mask is None
        assert len(encode(group)) == 6  # header + the five tensors of a single-turn group
        assert group.prompt_ids.tolist() == encode_prompt(tok, p.prompt, PromptSettings("plain"))
        for ep in eps:
            assert ep.turns == 1
            assert ep.reward == task.reward(p, tok.decode(ep.ids, skip_special_tokens=True))


def test_renderer_suffix_with_an_im_start_template(chat_model_dir):
    """A Qwen-style template: the env text closes the model's turn only if the model did not."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_model_dir)
    tok.chat_template = QWEN_LIKE
    r = Renderer(tok, PromptSettings("chat"))
    msgs = [{"role": "tool", "content": "42"}]
    # the model's last token is not <|im_end|> (the tiny vocabulary has none): close its turn
    assert r.env_text(msgs, last_token=5) == ("<|im_end|>\n<|im_start|>tool\n42<|im_end|>\n"
                                              "<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="suffix"):
        tok.chat_template = ("{% for m in messages[-1:] %}{{ m['content'] }}{% endfor %}")
        Renderer(tok, PromptSettings("chat")).env_text(msgs, None)


def test_episode_prompts_match_the_actor(chat_setup):
    engine, tok = chat_setup
    task, runner = _runner(engine, tok)
    prompts = EpisodePrompts(lambda: RetryEnv(task, feedback="{prompt}"), task, tok,
                             PromptSettings("chat"))
    played = runner.run([task.train_problem(7)], 2, 1.0, seed=0)
    assert prompts(7) == played[0][0].prompt


def test_limits_turns_and_tokens(chat_setup, one_thread):
    engine, tok = chat_setup
    task, runner = _runner(engine, tok, "plain", turns=2, cap=16, concurrency=3)
    played = runner.run([task.train_problem(i) for i in range(4)], 2, 1.0, seed=3)
    for eps in played:
        for ep in eps:
            assert 1 <= ep.turns <= 2 and len(ep.ids) <= 16
            if len(ep.ids) == 16:
                assert ep.finish_reason == "length"


class Boom(SingleTurnEnv):
    def step(self, model_turn):
        raise RuntimeError("tool crashed")


def test_a_failing_step_costs_one_episode(chat_setup):
    engine, tok = chat_setup
    task = ArithmeticTask()
    runner = EpisodeRunner(engine, tok, lambda: Boom(task), PromptSettings("plain"),
                           EpisodeLimits(2, 12, 6), failure_reward=-1.0)
    played = runner.run([task.train_problem(0)], 3, 1.0)
    assert [ep.reward for ep in played[0]] == [-1.0] * 3
    assert runner.stats["step_failures"] == 3


def test_step_result_rejects_bad_values():
    with pytest.raises(ValueError, match="finite"):
        StepResult([], float("nan"), True)
    with pytest.raises(ValueError, match="role"):
        StepResult([{"role": "assistant", "content": "x"}], 0.0, False)


# ---------------------------------------------------------------- wire and loss


def _group_with_mask(mask, logprobs):
    from rapid_async.actor.rollout import pack_group
    from rapid_async.engines.base import Completion

    comps = [Completion([3] * len(m), lp) for m, lp in zip(mask, logprobs)]
    g = pack_group("a", "0", 0, [1, 2], comps, [1.0, 0.0], 0.0)
    g.loss_mask = torch.zeros(g.completion_ids.shape, dtype=torch.int32)
    for i, m in enumerate(mask):
        g.loss_mask[i, :len(m)] = torch.tensor(m, dtype=torch.int32)
    return g


def test_loss_mask_on_the_wire():
    g = _group_with_mask([[1, 0, 1], [1]], [[-0.5, 0.0, -0.2], [-1.0]])
    frames = encode(g)
    assert len(frames) == 7
    back = decode(frames)
    assert torch.equal(back.loss_mask, g.loss_mask)
    bad = _group_with_mask([[1, 0, 1], [1]], [[-0.5, -0.3, -0.2], [-1.0]])
    with pytest.raises(ProtocolError, match="loss_mask is 0"):
        encode(bad)
    empty = _group_with_mask([[0, 0], [1]], [[0.0, 0.0], [-1.0]])
    with pytest.raises(ProtocolError, match="at least one model token"):
        encode(empty)


def test_loss_and_ratios_ignore_env_tokens_hand_checked():
    """Two rows (K = 2): row 0 has model tokens with delta 0.1 and 0.2 around an
    env token whose log-probs are garbage; row 1 one model token with delta 0."""
    logp = torch.tensor([[-1.0, -7.0, -2.0], [-0.5, 0.0, 0.0]], requires_grad=True)
    mu = torch.tensor([[-1.1, -2.0, -2.2], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    rewards = torch.tensor([1.0, 0.0])
    settings = LossSettings("rapid", eta=2.0, eps=float("inf"))
    loss, metrics = compute_loss(logp, mu, mask, rewards, 2, settings)
    # by hand: w0 = exp(0.1 + 0.2), w1 = 1; baseline = (min(w0, 2) * 1 + 1 * 0) / 2
    w0 = math.exp(0.3)
    base = w0 / 2
    a0, a1 = 1 - base, 0 - base
    row0 = (-math.exp(0.1) * a0 - math.exp(0.2) * a0) / 2
    row1 = -1.0 * a1
    assert float(loss.detach()) == pytest.approx((row0 + row1) / 2, rel=1e-6)
    assert metrics["is/weight_max"] == pytest.approx(w0, rel=1e-6)
    assert metrics["batch/tokens"] == 3
    loss.backward()
    assert float(logp.grad[0, 1]) == 0.0  # no gradient through the env token


def test_batch_select_keeps_tokens_after_env_turns():
    g = _group_with_mask([[1, 0, 0, 1], [1]], [[-0.5, 0.0, 0.0, -0.2], [-1.0]])
    batch = collate([g])
    part = batch.select([0, 1])
    assert part.mask.shape[1] == 4 and part.mask[0].tolist() == [1.0, 0.0, 0.0, 1.0]


# ---------------------------------------------------------------- config and loading


def test_env_config_and_loading():
    from rapid_async.config import episode_token_cap, load_config
    from rapid_async.envs import env_factory

    cfg = load_config(None, ["env.name=retry", "env.options.feedback={prompt}",
                             "env.max_turns=4", "algo.max_new_tokens=8"])
    assert episode_token_cap(cfg) == 32 and cfg.env.options == {"feedback": "{prompt}"}
    env = env_factory(cfg, ArithmeticTask())()
    assert isinstance(env, RetryEnv) and env.feedback == "{prompt}"
    assert env_factory(load_config(None, []), ArithmeticTask()) is None  # no [env]: as before
    path = load_config(None, ["env.name=rapid_async.envs.base:SingleTurnEnv"])
    assert isinstance(env_factory(path, ArithmeticTask())(), SingleTurnEnv)
    with pytest.raises(ValueError, match="unknown environment 'nope'"):
        env_factory(load_config(None, ["env.name=nope"]), ArithmeticTask())
    with pytest.raises(ValueError, match="bad options"):
        env_factory(load_config(None, ["env.name=retry", "env.options.colour=1"]),
                    ArithmeticTask())
    with pytest.raises(ValueError, match="env.max_episode_tokens = 4 is less than one model turn"):
        load_config(None, ["env.name=retry", "env.max_episode_tokens=4",
                           "algo.max_new_tokens=8"])
    with pytest.raises(ValueError, match="env.max_turns"):
        load_config(None, ["env.max_turns=0"])
