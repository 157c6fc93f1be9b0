"""Tool calls, the sandboxed Python tool, and the built-in gsm8k / MBPP environments."""

from __future__ import annotations

import pytest

from rapid_async.envs.mbpp_feedback import MBPPFeedbackEnv, visible_tests
from rapid_async.envs.python_math import PythonMathEnv
from rapid_async.envs.tools import parse_tool_calls

CALL = '<tool_call>\n{"name": "python", "arguments": {"code": "%s"}}\n</tool_call>'


def test_parse_tool_calls_and_their_errors():
    calls = parse_tool_calls("think " + CALL % "print(1)" + " and " + CALL % "x")
    assert [(c.name, c.arguments, c.error) for c in calls] == [
        ("python", {"code": "print(1)"}, ""), ("python", {"code": "x"}, "")]
    assert parse_tool_calls("no calls here") == []
    assert "not valid JSON" in parse_tool_calls("<tool_call>{oops</tool_call>")[0].error
    assert "not terminated" in parse_tool_calls('<tool_call>{"name": "python"')[0].error
    assert "JSON object" in parse_tool_calls('<tool_call>[1, 2]</tool_call>')[0].error
    string_args = parse_tool_calls('<tool_call>{"name": "python", "arguments": '
                                   '"{\\"code\\": \\"1\\"}"}</tool_call>')[0]
    assert string_args.arguments == {"code": "1"}


@pytest.fixture(scope="module")
def gsm8k(shared_data):
    from rapid_async.tasks.gsm8k import GSM8KTask

    return GSM8KTask(train_path=str(shared_data / "gsm8k" / "train.jsonl"),
                     test_path=str(shared_data / "gsm8k" / "test.jsonl"))


def test_python_math_runs_code_in_the_sandbox_and_scores_the_final_answer(gsm8k):
    env = PythonMathEnv(gsm8k, timeout_s=5.0)
    problem = gsm8k.train_problem(0)
    opening = env.reset(problem)
    assert opening[0]["role"] == "system" and opening[1]["content"] == problem.prompt
    assert env.tools[0]["function"]["name"] == "python"
    answer = problem.answer.split("####")[-1].strip()
    step = env.step("Let me compute. " + CALL % f"print({answer} * 1)")
    assert not step.done and step.info["tool_calls"] == 1
    assert step.messages == [{"role": "tool", "content": answer}]
    step = env.step(CALL % "import socket; socket.create_connection((\\\"1.1.1.1\\\", 80))")
    assert not step.done and "error" in step.messages[0]["content"].lower()  # no network
    step = env.step(CALL % "1/0")
    assert "ZeroDivisionError" in step.messages[0]["content"] and "exit status" in \
        step.messages[0]["content"]
    bad = env.step('<tool_call>{"name": "calculator", "arguments": {}}</tool_call>')
    assert bad.messages[0]["content"].startswith("error: unknown tool")
    assert bad.info["tool_errors"] == 1
    final = env.step(f"The answer is #### {answer}")
    assert final.done and final.reward == 1.0
    env.reset(problem)
    assert env.step("#### 123456789").reward == 0.0


@pytest.fixture(scope="module")
def mbpp(shared_data):
    from rapid_async.tasks.mbpp import MBPPTask

    return MBPPTask(variant="original", path=str(shared_data / "mbpp" / "mbpp.jsonl"))


def test_mbpp_feedback_shows_the_failing_test_and_rewards_the_final_program(mbpp):
    env = MBPPFeedbackEnv(mbpp, timeout_s=10.0)
    problem = mbpp.train_problem(0)
    env.reset(problem)
    tests = visible_tests(problem.prompt)
    assert len(tests) == 1 and tests[0].startswith("assert ")
    entry = problem.meta["entry_point"]
    wrong = f"```python\ndef {entry}(*args):\n    return None\n```"
    step = env.step(wrong)
    assert not step.done and step.reward == 0.0
    feedback = step.messages[0]["content"]
    assert "AssertionError" in feedback and "Fix the program" in feedback
    right = f"```python\n{problem.answer}\n```"
    final = env.step(right)
    assert final.done and final.reward == 1.0 == mbpp.reward(problem, right)
    env.reset(problem)
    assert "SyntaxError" in env.step("I do not know").messages[0]["content"]
