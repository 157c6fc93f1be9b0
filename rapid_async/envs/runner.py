"""Many episodes at once: model turns batched into engine calls, env steps beside them.

Used by the actor (`envs/rollout.py`: training groups), evaluation
(`rapid_async.evaluate` with an environment) and `bin/bench-episodes`.

`EpisodeRunner.run(problems, n)` plays n episodes per problem. Up to
`concurrency` episodes are live at a time. The loop:

    start episodes (env.reset, render the opening) until `concurrency` are live
    if some episodes wait for the model:
        one engine call for all of them (n = 1 each, their own contexts)
        each new turn: keep the sampled ids and log-probs (loss mask 1);
        hand env.step(turn text) to the step threads
    else: wait for the first env step to finish (counted as idle time)
    a finished step: done, out of turns or tokens -> the episode ends with
    its reward; else its messages are rendered (`envs/render.py`) and
    appended as ids with loss mask 0, and the episode waits for the model

so tools and checkers run while the engine generates for the other
episodes. The context of every turn is the opening ids followed by every
earlier turn's ids exactly as sampled or rendered: nothing is re-tokenized.

Limits (`EpisodeLimits`): model turns per episode, tokens after the prompt
per episode (model + env), tokens per model turn. A model turn that would
pass the episode cap is cut there and ends the episode; a turn cut at the
per-turn cap goes to the environment like any other. An episode whose last
model turn was cut, or whose env tokens do not fit, ends with the last step's
reward and finish "length" (`algo.truncated` applies to it).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Callable

from rapid_async.engines.base import GenerateRequest
from rapid_async.envs.base import Environment, StepResult
from rapid_async.envs.render import Renderer
from rapid_async.tasks.base import Problem
from rapid_async.tasks.prompts import PromptSettings, decode_completion

log = logging.getLogger("rapid.envs")


@dataclass(frozen=True)
class EpisodeLimits:
    """Per-episode limits.

    Attributes:
        max_turns: model turns at most.
        max_tokens: tokens after the prompt at most (model and env turns).
        turn_tokens: tokens per model turn at most (algo.max_new_tokens).
    """

    max_turns: int = 3
    max_tokens: int = 1024
    turn_tokens: int = 256

    def __post_init__(self) -> None:
        if min(self.max_turns, self.max_tokens, self.turn_tokens) < 1:
            raise ValueError(f"episode limits must be >= 1, got {self}")

    @classmethod
    def from_config(cls, cfg: Any) -> EpisodeLimits:
        from rapid_async.config import episode_token_cap

        return cls(cfg.env.max_turns if cfg.env.name else 1, episode_token_cap(cfg),
                   cfg.algo.max_new_tokens)


@dataclass
class Episode:
    """One episode's tokens and outcome.

    Attributes:
        problem: the problem it plays.
        prompt: the opening's token ids.
        ids, mask, logprobs: every token after the prompt; mask 1 on the
            model's tokens (logprobs its behaviour log-probs), 0 on env
            tokens (logprob 0).
        turns: model turns taken; texts: their decoded texts.
        reward, finish_reason: the outcome ("stop" or "length").
        info: summed step info (tool calls, errors...).
    """

    problem: Problem
    env: Environment | None = None
    prompt: list[int] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    turns: int = 0
    texts: list[str] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    reward: float = 0.0
    finish_reason: str = "stop"
    cut: bool = False
    last_cut: bool = False
    done: bool = False
    info: dict[str, float] = field(default_factory=dict)

    @property
    def context(self) -> list[int]:
        return self.prompt + self.ids

    @property
    def model_tokens(self) -> int:
        return sum(self.mask)

    def transcript(self) -> str:
        """The conversation as text (for evaluation records)."""
        return "\n".join(f"[{m['role']}] {m['content']}" for m in self.messages)


class EpisodeRunner:
    """Plays episodes of one environment on one engine (see the module docstring).

    Args:
        engine: any Engine.
        tokenizer: the model's tokenizer.
        factory: makes one Environment per live episode.
        settings: prompt format and stop strings of the run.
        limits: turn and token limits.
        concurrency: live episodes at most (0: all of a call).
        step_workers: threads running env steps.
        failure_reward: reward of an episode whose env step raised.
    """

    def __init__(self, engine: Any, tokenizer: Any, factory: Callable[[], Environment],
                 settings: PromptSettings, limits: EpisodeLimits, concurrency: int = 0,
                 step_workers: int = 8, failure_reward: float = 0.0):
        self.engine, self.tokenizer, self.factory = engine, tokenizer, factory
        self.settings, self.limits = settings, limits
        self.concurrency, self.failure_reward = concurrency, failure_reward
        self._free: list[Environment] = [factory()]
        probe = self._free[0]
        self.renderer = Renderer(tokenizer, settings, getattr(probe, "tools", None))
        self.stop = tuple(dict.fromkeys([*settings.stop, *getattr(probe, "stop_strings", ())]))
        self.pool = ThreadPoolExecutor(max_workers=step_workers, thread_name_prefix="env-step")
        self.stats: dict[str, float] = {"gen_s": 0.0, "idle_s": 0.0, "step_s": 0.0,
                                        "engine_calls": 0, "episodes": 0, "model_tokens": 0,
                                        "env_tokens": 0, "step_failures": 0, "turns": 0}

    # ------------------------------------------------------------------ episodes

    def _env(self) -> Environment:
        return self._free.pop() if self._free else self.factory()

    def _start(self, problem: Problem) -> Episode:
        env = self._env()
        messages = env.reset(problem)
        ep = Episode(problem, env, self.renderer.opening(messages), messages=list(messages))
        return ep

    def _finish(self, ep: Episode, reward: float, length: bool = False) -> None:
        ep.reward, ep.done = float(reward), True
        ep.finish_reason = "length" if (length or ep.cut or ep.last_cut) else "stop"
        self._free.append(ep.env)
        ep.env = None
        self.stats["episodes"] += 1

    def _timed_step(self, env: Environment, text: str) -> tuple[StepResult, float]:
        t0 = time.perf_counter()
        result = env.step(text)
        if not isinstance(result, StepResult):
            raise TypeError(f"{type(env).__name__}.step returned {type(result).__name__}, "
                            "not a StepResult")
        return result, time.perf_counter() - t0

    def _add_turn(self, ep: Episode, comp: Any) -> str:
        room = self.limits.max_tokens - len(ep.ids)
        ids, lps = list(comp.token_ids), list(comp.logprobs)
        ep.last_cut = comp.finish_reason == "length"
        if len(ids) >= room:  # the episode's token cap: it ends after this step
            ids, lps, ep.cut = ids[:room], lps[:room], True
            ep.last_cut = ep.last_cut or len(comp.token_ids) > room
        ep.ids += ids
        ep.mask += [1] * len(ids)
        ep.logprobs += [min(0.0, float(x)) for x in lps]
        ep.turns += 1
        text = decode_completion(self.tokenizer, ids)
        ep.texts.append(text)
        ep.messages.append({"role": "assistant", "content": text})
        self.stats["model_tokens"] += len(ids)
        self.stats["turns"] += 1
        return text

    def _after_step(self, ep: Episode, fut: Future) -> bool:
        """Apply a finished step; True when the episode waits for the model again."""
        try:
            result, seconds = fut.result()
            self.stats["step_s"] += seconds
        except Exception as exc:  # an environment bug ends the episode, not the actor
            self.stats["step_failures"] += 1
            log.warning("environment step on prompt %s raised %s: %s; scored %s",
                        ep.problem.prompt_id, type(exc).__name__, exc, self.failure_reward)
            self._free.append(self.factory())  # the failed instance is not reused
            ep.env = None
            ep.reward, ep.done, ep.finish_reason = self.failure_reward, True, "stop"
            self.stats["episodes"] += 1
            return False
        for key, value in result.info.items():
            ep.info[key] = ep.info.get(key, 0.0) + float(value)
        if result.done or ep.turns >= self.limits.max_turns or ep.cut:
            self._finish(ep, result.reward)
            return False
        env_ids = self.renderer.env_turn(result.messages, ep.ids[-1] if ep.ids else None)
        if len(ep.ids) + len(env_ids) >= self.limits.max_tokens:  # no room for a model token
            self._finish(ep, result.reward, length=True)
            return False
        ep.ids += env_ids
        ep.mask += [0] * len(env_ids)
        ep.logprobs += [0.0] * len(env_ids)
        ep.messages += result.messages
        self.stats["env_tokens"] += len(env_ids)
        return True

    # ------------------------------------------------------------------ the loop

    def run(self, problems: list[Problem], n: int, temperature: float,
            seed: int | None = None) -> list[list[Episode]]:
        """Play `n` episodes of each problem.

        Args:
            problems: the problems.
            n: episodes per problem (the group size K; 1 for greedy evaluation).
            temperature: sampling temperature of model turns (0: greedy).
            seed: sampling seed of the first engine call (then seed + call).

        Returns:
            Per problem its n finished episodes, in order.

        Raises:
            ValueError: episodes of one problem open with different prompts.
        """
        slots = [(p, j) for p in problems for j in range(n)]
        out: list[list[Episode | None]] = [[None] * n for _ in problems]
        todo = deque(range(len(slots)))
        cap = self.concurrency or len(slots)
        ready: list[int] = []
        live: dict[int, Episode] = {}
        running: dict[Future, int] = {}
        calls = 0
        while todo or ready or running:
            while todo and len(live) < cap:
                i = todo.popleft()
                live[i] = self._start(slots[i][0])
                ready.append(i)
            if ready:
                batch, ready = ready, []
                room = max(self.limits.max_tokens - len(live[i].ids) for i in batch)
                t0 = time.perf_counter()
                comps = self.engine.generate(GenerateRequest(
                    prompts=[live[i].context for i in batch], n=1, temperature=temperature,
                    max_new_tokens=max(1, min(self.limits.turn_tokens, room)),
                    seed=None if seed is None else seed + calls, stop=self.stop))
                self.stats["gen_s"] += time.perf_counter() - t0
                self.stats["engine_calls"] += 1
                calls += 1
                for i, (comp,) in zip(batch, comps):
                    ep = live[i]
                    text = self._add_turn(ep, comp)
                    running[self.pool.submit(self._timed_step, ep.env, text)] = i
                finished = [f for f in running if f.done()]
            else:
                t0 = time.perf_counter()
                finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                self.stats["idle_s"] += time.perf_counter() - t0
            for fut in finished:
                i = running.pop(fut)
                ep = live[i]
                if self._after_step(ep, fut):
                    ready.append(i)
                else:
                    problem_index, j = divmod(i, n)
                    out[problem_index][j] = live.pop(i)
        for group in out:
            if len({tuple(ep.prompt) for ep in group}) > 1:
                raise ValueError(f"episodes of prompt {group[0].problem.prompt_id} opened "
                                 "with different prompts: env.reset must be a pure function "
                                 "of the problem")
        return out  # type: ignore[return-value]

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for env in self._free:
            env.close()
        self._free = []
