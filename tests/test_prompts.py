"""Prompt encoding (plain / chat with a system prompt) and stop-string settings."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from rapid_async.config import load_config
from rapid_async.tasks.arithmetic import ArithmeticTask
from rapid_async.tasks.prompts import PromptSettings, encode_prompt, render_prompt


def test_plain_is_the_tokenizer_on_the_raw_text(random_model_dir):
    tok = AutoTokenizer.from_pretrained(random_model_dir)
    ids = encode_prompt(tok, "12+34=", PromptSettings("plain"))
    assert ids == tok("12+34=")["input_ids"]
    assert tok.decode(ids) == "<bos>12+34="


def test_chat_uses_the_template_with_the_system_prompt(chat_model_dir):
    tok = AutoTokenizer.from_pretrained(chat_model_dir)
    settings = PromptSettings("chat", system_prompt="0")
    assert render_prompt(tok, "12+34", settings) == "<bos>(0)12+34="
    ids = encode_prompt(tok, "12+34", settings)
    assert tok.decode(ids) == "<bos>(0)12+34="  # one <bos>: none added on top of the template's
    assert tok.decode(encode_prompt(tok, "7", PromptSettings("chat"))) == "<bos>7="


def test_chat_without_a_template_is_refused(random_model_dir):
    tok = AutoTokenizer.from_pretrained(random_model_dir)
    with pytest.raises(ValueError, match="no chat template.*prompt_format = 'plain'"):
        encode_prompt(tok, "1+1", PromptSettings("chat"))
    with pytest.raises(ValueError, match="task.prompt_format = 'html'"):
        PromptSettings("html")


def test_settings_from_config_merge_task_and_run_stop_strings():
    task = ArithmeticTask()
    task.stop_strings = ["\n\n"]
    task.system_prompt = "task default"
    cfg = load_config(overrides=['task.stop=["END", "\\n\\n"]', "task.prompt_format=chat"])
    settings = PromptSettings.from_config(cfg, task)
    assert settings.stop == ("\n\n", "END")
    assert settings.system_prompt == "task default" and settings.prompt_format == "chat"
    cfg = load_config(overrides=["task.system_prompt=Be brief."])
    assert PromptSettings.from_config(cfg, task).system_prompt == "Be brief."
