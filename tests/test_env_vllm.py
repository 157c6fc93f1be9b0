"""Multi-turn episodes on the vLLM engine (prefix caching on): token in, token out."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from rapid_async.engines.vllm import VLLMEngine  # noqa: E402
from test_envs import check_token_in_token_out  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


class RecordingVLLM(VLLMEngine):
    """The real vLLM engine, keeping every request's prompts and sampled turns."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def generate(self, request):
        out = super().generate(request)
        self.calls.append(([list(p) for p in request.prompts], [c for (c,) in out]))
        return out


def test_vllm_episodes_keep_the_sampled_tokens(chat_model_dir, one_thread):
    engine = RecordingVLLM(chat_model_dir, dtype="float32", seed=0, max_model_len=64,
                           block_size=32, enforce_eager=True)
    try:
        learner = AutoModelForCausalLM.from_pretrained(chat_model_dir, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(chat_model_dir)
        check_token_in_token_out(engine, tok, learner, 1e-3, concurrency=4)
    finally:
        engine.close()
