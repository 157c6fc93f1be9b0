"""`python-math`: math word problems (gsm8k) with a sandboxed Python tool.

The model may call the `python` tool (`envs/tools.py`) in the chat template's
tool format any number of turns before it answers; a turn without a tool
call is its final answer, scored by the task's verifier (for gsm8k: the
final number, after "####", in the last \\boxed{} or the last number). Tool
results and tool errors come back as "tool" messages. Use with
`task.prompt_format = "chat"` and a model whose template knows tools.

Options: `system_prompt` (default below), `timeout_s` (per program, 10),
`max_output_chars` (2000), `isolation` (sandbox mode, "auto").
"""

from __future__ import annotations

from typing import Any

from rapid_async.envs.tools import PythonTool, ToolEnv, shared_sandbox

SYSTEM_PROMPT = ("Solve the math problem. You may run Python code with the python tool to "
                 "compute; call it as <tool_call>{\"name\": \"python\", \"arguments\": "
                 "{\"code\": \"...\"}}</tool_call>. When you are done, answer without a tool "
                 "call and put the final number after ####.")


class PythonMathEnv(ToolEnv):
    """A math task with the Python tool (see the module docstring)."""

    name = "python-math"

    def __init__(self, task: Any, system_prompt: str = "", timeout_s: float = 10.0,
                 max_output_chars: int = 2000, isolation: str = "auto"):
        sandbox = shared_sandbox(timeout_s=timeout_s, isolation=isolation)
        super().__init__(task, [PythonTool(sandbox, max_output_chars)],
                         system_prompt or SYSTEM_PROMPT)
