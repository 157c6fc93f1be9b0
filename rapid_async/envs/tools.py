"""Tool calling in the chat template's tool format, and the sandboxed Python tool.

Used by the tool environments (`python_math.py`, user environments built on
`ToolEnv`). The model calls a tool as Qwen2.5 / Qwen3 chat templates teach:

    <tool_call>
    {"name": "python", "arguments": {"code": "print(2 + 3)"}}
    </tool_call>

and each call's result comes back as a message with role "tool" (the
template renders it, e.g. inside <tool_response> ... </tool_response>).
Model turns stop at "</tool_call>", so the environment answers a call at
once. A call that is not JSON, names an unknown tool, has bad arguments,
is left unterminated or whose tool fails is answered with an error message
the model can read; nothing the model writes raises here.

`PythonTool` runs the code in the task sandbox (`tasks.sandbox.Sandbox.run`:
no network, resource limits, a scratch directory) and returns what it
printed, its error output and its exit status, cut to `max_chars`.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from typing import Any

from rapid_async.envs.base import Environment, StepResult

TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
OPEN_CALL = "<tool_call>"
MAX_CALLS_PER_TURN = 4


@dataclass
class ToolCall:
    """One parsed call (`error` set when the call could not be parsed)."""

    name: str = ""
    arguments: dict | None = None
    error: str = ""


def parse_tool_calls(text: str) -> list[ToolCall]:
    """The tool calls in a model turn, in order (an unterminated one as an error)."""
    calls: list[ToolCall] = []
    for body in TOOL_CALL.findall(text):
        calls.append(_parse_one(body.strip()))
    closed = text.count("</tool_call>")
    if text.count(OPEN_CALL) > closed:
        calls.append(ToolCall(error="the tool call is not terminated with </tool_call>"))
    return calls


def _parse_one(body: str) -> ToolCall:
    try:
        value = json.loads(body)
    except json.JSONDecodeError as err:
        return ToolCall(error=f"the tool call is not valid JSON ({err.msg} at char {err.pos})")
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return ToolCall(error='a tool call must be a JSON object {"name": ..., "arguments": {...}}')
    args = value.get("arguments", {})
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            pass
    if not isinstance(args, dict):
        return ToolCall(value["name"], error="the tool call's arguments must be a JSON object")
    return ToolCall(value["name"], args)


class Tool:
    """A function the model may call. Subclasses set name, description,
    parameters (a JSON schema) and implement `run(**arguments) -> str`."""

    name = "tool"
    description = ""
    parameters: dict = {"type": "object", "properties": {}}

    def schema(self) -> dict:
        """The tool as chat templates take it (`tools=`)."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}

    def run(self, **arguments: Any) -> str:
        raise NotImplementedError


_SANDBOXES: dict[tuple, Any] = {}
_SANDBOX_LOCK = threading.Lock()


def shared_sandbox(timeout_s: float = 10.0, memory_mb: int = 1024, max_parallel: int = 4,
                   isolation: str = "auto") -> Any:
    """One Sandbox per setting in this process (the episodes share it)."""
    from rapid_async.tasks.sandbox import Limits, Sandbox

    key = (timeout_s, memory_mb, max_parallel, isolation)
    with _SANDBOX_LOCK:
        if key not in _SANDBOXES:
            _SANDBOXES[key] = Sandbox(Limits(wall_s=timeout_s, cpu_s=max(1, int(timeout_s)),
                                             memory_mb=memory_mb),
                                      max_parallel=max_parallel, isolation=isolation)
        return _SANDBOXES[key]


class PythonTool(Tool):
    """Runs Python code in the sandbox and returns its output.

    Args:
        sandbox: a `tasks.sandbox.Sandbox` (default: `shared_sandbox()`).
        max_chars: longest result returned (the rest is cut, and said so).
    """

    name = "python"
    description = ("Run a Python 3 program and return what it prints (stdout), its errors "
                   "(stderr) and its exit status. No network; print the values you need.")
    parameters = {"type": "object", "properties": {"code": {
        "type": "string", "description": "The complete Python program to run."}},
        "required": ["code"]}

    def __init__(self, sandbox: Any = None, max_chars: int = 2000):
        self.sandbox = sandbox
        self.max_chars = max_chars

    def run(self, code: Any = None, **extra: Any) -> str:
        if extra:
            raise ValueError(f"unexpected arguments {sorted(extra)}; python takes only 'code'")
        if not isinstance(code, str) or not code.strip():
            raise ValueError("'code' must be a non-empty string")
        sandbox = self.sandbox or shared_sandbox()
        result = sandbox.run(code)
        parts = [result.stdout.rstrip()]
        if result.stderr.strip():
            parts.append("stderr:\n" + result.stderr.strip()[-self.max_chars:])
        if result.timed_out:
            parts.append("(killed: it ran out of time)")
        elif result.returncode:
            parts.append(f"(exit status {result.returncode})")
        text = "\n".join(p for p in parts if p) or "(no output)"
        if len(text) > self.max_chars:
            text = text[:self.max_chars] + f"\n... ({len(text) - self.max_chars} more characters cut)"
        return text


class ToolEnv(Environment):
    """An environment where the model may call tools before it answers.

    A model turn with tool calls gets one "tool" message per call (results or
    errors) and another turn; a turn without calls is the final answer,
    scored by `final_reward` (default: the task's verifier), which ends the
    episode. An episode cut by the turn limit is scored on its last turn.

    Args:
        task: the task; tools: the tools offered; system_prompt: as Environment.
    """

    name = "tools"
    stop_strings = ("</tool_call>",)

    def __init__(self, task: Any, tools: list[Tool], system_prompt: str = ""):
        super().__init__(task, system_prompt)
        self.by_name = {t.name: t for t in tools}
        self.tools = [t.schema() for t in tools]

    def final_reward(self, text: str) -> float:
        return float(self.task.reward(self.problem, text))

    def call(self, call: ToolCall) -> tuple[str, bool]:
        """(the tool message's text, whether it is an error)."""
        if call.error:
            return f"error: {call.error}", True
        tool = self.by_name.get(call.name)
        if tool is None:
            return f"error: unknown tool {call.name!r}; tools: {', '.join(self.by_name)}", True
        try:
            return tool.run(**call.arguments), False
        except Exception as exc:  # the model's mistake or the tool's: told to the model
            return f"error: {type(exc).__name__}: {exc}", True

    def step(self, model_turn: str) -> StepResult:
        self.turn += 1
        calls = parse_tool_calls(model_turn)
        if not calls:
            return StepResult([], self.final_reward(model_turn), True)
        messages, errors = [], 0
        for call in calls[:MAX_CALLS_PER_TURN]:
            text, failed = self.call(call)
            errors += failed
            messages.append({"role": "tool", "content": text})
        if len(calls) > MAX_CALLS_PER_TURN:
            messages.append({"role": "tool", "content": f"error: at most {MAX_CALLS_PER_TURN} "
                                                        "tool calls per turn; the rest were "
                                                        "not run"})
        return StepResult(messages, self.final_reward(model_turn), False,
                          {"tool_calls": len(calls), "tool_errors": errors})
