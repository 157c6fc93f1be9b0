"""Benchmark of the weight path at Qwen2.5-0.5B's shape (run by `bin/bench-weights`).

Not a test and never on the runtime path. A Qwen2-architecture model with
Qwen2.5-0.5B's configuration is built from code (random init, no download);
fp32 master weights take 5 AdamW steps at lr 1e-6 on the RAPID loss of
random-token rollouts with random 0/1 rewards (so that gradients are real), and
every version is published in bfloat16 the way the learner publishes it. The
actor side then takes the updates into the hf engine and into the vLLM engine.

It measures, for each delta: bytes, the zero-order entropy bound of the change
(`entropy_bound_bytes` below), the ratio to the bf16 snapshot, the time the
training loop was blocked, the encode time, apply + verify time, the vLLM
engine's load time, and bit-exactness (sha256 of the actor's tensors against
the learner's cast tensors, computed here independently of the code under
test); and the snapshot's build and install throughput.

Two implementations share the harness: `after` (this tree's
`rapid_async.weights`) and `before` (the code path of an older commit, which
`bin/bench-weights` unpacks with `git archive` and puts first on PYTHONPATH;
this file is then run by path and imports `rapid_async` from there). Parts run
as separate commands (each a few minutes, so each can hold the shared lock):

    python PATH/weights.py --impl before --part learner --dir D
    python PATH/weights.py --impl before --part actor-hf --dir D
    python PATH/weights.py --impl before --part actor-vllm --dir D

Each part writes D/<part>.json; `rapid_async.bench.weights_report` turns the
JSON of both implementations into the Markdown table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import struct
import sys
import time
from pathlib import Path

import torch

DTYPE = "bfloat16"
STEPS = 5
LR = 1e-6
QWEN05 = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
              num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
              rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=151643,
              eos_token_id=151643)
"""Qwen2.5-0.5B's architecture (494M parameters, tied embeddings)."""
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1)
"""`--size tiny`: the same vocabulary, a tiny body (a dry run of the harness)."""
GROUPS, K, PROMPT, COMPLETION = 4, 4, 16, 48
"""The training mini-batch: 4 groups of K = 4 completions, 16 + 48 tokens each."""
OPTIONS = {"device": "cpu", "size": "0.5b"}
"""Set by main(): where the learner and the hf engine run, and the model size."""


# ---------------------------------------------------------------- the learner


def build_model(seed: int = 0, **overrides):
    """Qwen2.5-0.5B's architecture from code (or `TINY`), random init, fp32."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    size = TINY if OPTIONS["size"] == "tiny" else {}
    return Qwen2ForCausalLM(Qwen2Config(**{**QWEN05, **size, **overrides}))


def _sync() -> None:
    if OPTIONS["device"].startswith("cuda"):
        torch.cuda.synchronize()


def train_step(model, optimizer, generator: torch.Generator) -> float:
    """One AdamW step on the RAPID loss of a random-token mini-batch; returns seconds."""
    from rapid_async.loss import LossSettings, compute_loss

    _sync()
    start = time.perf_counter()
    device = OPTIONS["device"]
    b = GROUPS * K
    ids = torch.randint(0, model.config.vocab_size, (b, PROMPT + COMPLETION), generator=generator)
    noise = 0.01 * torch.randn(b, COMPLETION, generator=generator)
    rewards = torch.randint(0, 2, (b,), generator=generator).float()
    ids, noise, rewards = ids.to(device), noise.to(device), rewards.to(device)
    logits = model(input_ids=ids).logits[:, PROMPT - 1:-1].float()  # (B, T, V)
    logprobs = torch.log_softmax(logits, -1).gather(-1, ids[:, PROMPT:, None]).squeeze(-1)
    loss, _ = compute_loss(logprobs, logprobs.detach() + noise, torch.ones(b, COMPLETION, device=device),
                           rewards, K, LossSettings())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    _sync()
    return time.perf_counter() - start


def cast_params(model) -> dict[str, torch.Tensor]:
    """The parameters (tied ones once) in the inference dtype, as new CPU tensors."""
    return {n: p.detach().to("cpu", torch.bfloat16, copy=True) for n, p in model.named_parameters()}


def tensors_sha(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over sorted names and raw bytes: this benchmark's own equality check."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode() + b"\0")
        digest.update(tensors[name].detach().cpu().contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


def entropy_bound_bytes(old: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> dict:
    """Zero-order entropy of the per-element change symbols, whole state (bytes).

    Symbol of element i: (new bits - old bits) mod 2^16 (0 when unchanged).
    See `rapid_async.weights.codec.entropy_bound_bits` for the definition;
    computed here from the two states, independently of the code under test.
    """
    counts = torch.zeros(1 << 16, dtype=torch.int64)
    n = changed = 0
    for name in new:
        diff = (new[name].view(torch.int16).to(torch.int32) - old[name].view(torch.int16).to(torch.int32)) & 0xFFFF
        counts += torch.bincount(diff.reshape(-1), minlength=1 << 16)
        n += diff.numel()
    changed = n - int(counts[0])
    c = counts[counts > 0].double()
    bits = float(n * math.log2(n) - (c * torch.log2(c)).sum())
    return {"entropy_bound_bytes": bits / 8, "changed": changed, "elements": n}


def run_learner(impl, out: Path) -> dict:
    """Train 5 steps, publish each version; save the updates and the expected digests."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    model = build_model()
    prev = cast_params(model)
    save_model_dir(model, prev, out)
    model.to(OPTIONS["device"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    side = impl.learner(model)
    expected = {0: tensors_sha(prev)}
    snap, snap_s = side.snapshot(0)
    save_update(out / "v0.snapshot", snap)
    rows = []
    generator = torch.Generator().manual_seed(1)
    for version in range(1, STEPS + 1):
        update_s = train_step(model, optimizer, generator)
        blocked_s = side.publish(version)
        _sync()
        cur = cast_params(model)
        expected[version] = tensors_sha(cur)
        rows.append({"version": version, "update_s": update_s, "blocked_s": blocked_s,
                     **entropy_bound_bytes(prev, cur)})
        prev = cur
        print(f"[bench] step {version}: update {update_s:.1f} s, blocked {blocked_s:.3f} s",
              flush=True)
    for row, (update, info) in zip(rows, side.finish()):
        save_update(out / f"v{row['version']}.delta", update)
        row.update(info, bytes=len(update.payload), version_published=update.version)
    return {"rows": rows, "expected_sha": expected, "snapshot_build_s": snap_s,
            "snapshot_bytes": len(snap.payload),
            "bf16_bytes": sum(t.numel() * 2 for t in prev.values()),
            "params": sum(t.numel() for t in prev.values())}


def save_model_dir(model, cast: dict[str, torch.Tensor], out: Path) -> None:
    """The version-0 model directory (bf16) that the engines start from."""
    model.config.dtype = DTYPE
    model.save_pretrained(out / "model", state_dict=dict(cast))
    model.config.dtype = "float32"


def save_update(path: Path, update) -> None:
    """Store a WeightUpdate as its wire frames (length-prefixed)."""
    from rapid_async.wire.protocol import encode

    with open(path, "wb") as f:
        for frame in encode(update):
            f.write(struct.pack("<Q", len(frame)))
            f.write(frame)


def load_update(path: Path):
    """Read back a WeightUpdate stored by `save_update`."""
    from rapid_async.wire.protocol import decode

    data, frames, offset = path.read_bytes(), [], 0
    while offset < len(data):
        (size,) = struct.unpack_from("<Q", data, offset)
        frames.append(data[offset + 8:offset + 8 + size])
        offset += 8 + size
    return decode(frames)


# ---------------------------------------------------------------- the actor


def run_actor(impl, out: Path, engine_name: str) -> dict:
    """Take the snapshot, then every delta, into one engine; time and check each."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    learner = json.loads((out / "learner.json").read_text())
    engine = make_engine(engine_name, out / "model")
    side = impl.actor(engine, engine_name)
    try:
        snap = load_update(out / "v0.snapshot")
        snap_timing = side.install(snap)
        assert side.sha() == learner["expected_sha"]["0"], "snapshot is not bit-exact"
        rows = []
        for row in learner["rows"]:
            update = load_update(out / f"v{row['version']}.delta")
            timing = side.install(update)
            exact = side.sha() == learner["expected_sha"][str(update.version)]
            rows.append({"version": update.version, "exact": exact, **timing})
            print(f"[bench] {engine_name}: version {update.version} {timing} exact={exact}",
                  flush=True)
    finally:
        engine.close()
    return {"snapshot": snap_timing, "rows": rows}


def make_engine(name: str, model_dir: Path):
    if name == "hf":
        from rapid_async.engines.hf import HFEngine

        return HFEngine(model_dir, device=OPTIONS["device"], dtype=DTYPE, seed=0)
    from rapid_async.engines.vllm import VLLMEngine

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return VLLMEngine(model_dir, dtype=DTYPE, seed=0, max_model_len=256, enforce_eager=True)


# ---------------------------------------------------------------- implementations


class BeforeLearner:
    """The learner's publish path of the older code: cast + make_delta on the training thread."""

    def __init__(self, model):
        from rapid_async import weights

        self.w, self.model = weights, model
        self.state = weights.cast_state(model.state_dict(), DTYPE)
        self.version, self.done = 0, []

    def snapshot(self, version: int):
        start = time.perf_counter()
        update = self.w.make_snapshot(self.state, version)
        return update, time.perf_counter() - start

    def publish(self, version: int) -> float:
        start = time.perf_counter()
        new = self.w.cast_state(self.model.state_dict(), DTYPE)
        update = self.w.make_delta(self.state, new, version, base_version=self.version)
        seconds = time.perf_counter() - start
        self.state, self.version = new, version
        self.done.append((update, {"encode_s": seconds, "raw_bytes": update.raw_nbytes}))
        return seconds

    def finish(self):
        return self.done


class BeforeActor:
    """The actor's install path of the older code: apply_update, then engine.load_weights."""

    def __init__(self, engine, engine_name: str):
        from rapid_async import weights

        self.w, self.engine = weights, engine
        self.state, self.version = None, None

    def install(self, update) -> dict:
        start = time.perf_counter()
        state = self.w.apply_update(self.state, self.version, update)
        applied = time.perf_counter()
        self.engine.load_weights(state)
        done = time.perf_counter()
        self.state, self.version = state, update.version
        return {"apply_verify_s": applied - start, "engine_load_s": done - applied,
                "total_s": done - start}

    def sha(self) -> str:
        return tensors_sha({n: t for n, t in self.state.items() if n != "lm_head.weight"})


IMPLS = {"before": (BeforeLearner, BeforeActor)}


class _Impl:
    def __init__(self, name: str):
        if name == "after":
            from rapid_async.bench.weights_after import AfterActor, AfterLearner

            IMPLS["after"] = (AfterLearner, AfterActor)
        self.learner, self.actor = IMPLS[name]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--impl", choices=["before", "after"], required=True)
    parser.add_argument("--part", choices=["learner", "actor-hf", "actor-vllm"], required=True)
    parser.add_argument("--dir", type=Path, required=True, help="work directory of this implementation")
    parser.add_argument("--device", default="cpu", help="learner and hf engine device (cpu, cuda)")
    parser.add_argument("--size", choices=["0.5b", "tiny"], default="0.5b")
    args = parser.parse_args(argv)
    OPTIONS.update(device=args.device, size=args.size)
    args.dir.mkdir(parents=True, exist_ok=True)
    impl = _Impl(args.impl)
    start = time.perf_counter()
    if args.part == "learner":
        result = run_learner(impl, args.dir)
    else:
        result = run_actor(impl, args.dir, args.part.split("-")[1])
    import rapid_async

    result.update(code=str(Path(rapid_async.__file__).parent), impl=args.impl, **OPTIONS, part=args.part, wall_s=time.perf_counter() - start,
                  threads=torch.get_num_threads(), python=sys.version.split()[0],
                  torch=torch.__version__)
    (args.dir / f"{args.part}.json").write_text(json.dumps(result, indent=1))
    print(f"[bench] {args.impl} {args.part} done in {result['wall_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
