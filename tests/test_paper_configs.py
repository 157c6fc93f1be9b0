"""configs/paper/*.toml: the RAPID paper's settings, checked against README's table."""

from __future__ import annotations

import pytest

from conftest import REPO
from rapid_async.config import load_config

PAPER = REPO / "configs" / "paper"


def readme_table() -> dict[str, dict[str, str]]:
    """Rows of README's "Paper configs" table: config name -> column -> cell."""
    text = (REPO / "README.md").read_text()
    section = text.split("### Paper configs", 1)[1]
    lines = []
    for line in section.splitlines():  # the first table after the heading, and only it
        if line.startswith("|"):
            lines.append(line)
        elif lines:
            break
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def values(cfg) -> dict[str, str]:
    """A loaded config written the way the README table writes it."""
    a, lr = cfg.algo, cfg.learner
    options = " ".join(f"{k}={cfg.task.options[k]}" for k in ("variant", "split_seed", "train_fraction")
                       if k in cfg.task.options)
    if "lean_project" in cfg.task.options:
        options = "lean_project (set it)"
    return {"loss": a.loss, "K": str(a.group_size), "eta": str(a.eta), "eps": str(a.eps),
            "beta": str(a.beta), "lr": str(lr.lr), "temperature": str(a.temperature),
            "max new tokens": str(a.max_new_tokens),
            "batch / minibatch groups": f"{lr.batch_groups} / {lr.minibatch_groups}",
            "H": str(cfg.updates_per_batch),
            "max staleness": str(lr.max_staleness) if cfg.run.mode == "rapid-async" else "-",
            "task options": options}


def test_one_config_per_task_and_mode_and_one_row_each():
    names = sorted(p.stem for p in PAPER.glob("*.toml"))
    expected = sorted(f"{t}-qwen2.5-0.5b-{m}" for t in ("gsm8k", "math", "mbpp", "minif2f")
                      for m in ("grpo", "rapid-sync", "rapid-async"))
    assert names == expected
    assert sorted(readme_table()) == expected


@pytest.mark.parametrize("path", sorted(PAPER.glob("*.toml")), ids=lambda p: p.stem)
def test_config_matches_the_readme_and_the_paper(path):
    cfg = load_config(path)
    row = readme_table()[path.stem]
    assert {k: row[k] for k in values(cfg)} == values(cfg)
    task, mode = path.stem.split("-qwen2.5-0.5b-")
    assert cfg.task.name == task and cfg.run.mode == mode
    assert cfg.model.path == "Qwen/Qwen2.5-0.5B-Instruct" and cfg.task.prompt_format == "chat"
    # The paper: K = 4, eta = 2, eps = 0.2, beta 0 (RAPID) / 0.04 (GRPO), lr 1e-6, T = 1, 2048 tokens.
    assert (cfg.algo.group_size, cfg.algo.eta, cfg.algo.eps, cfg.learner.lr) == (4, 2.0, 0.2, 1e-6)
    assert cfg.algo.beta == (0.04 if mode == "grpo" else 0.0)
    assert cfg.algo.temperature == 1.0 and cfg.algo.max_new_tokens == 2048
    assert cfg.updates_per_batch in ({1} if mode == "grpo" else {2, 4, 8, 16})
    if task == "mbpp":
        assert (cfg.task.options["split_seed"], cfg.task.options["train_fraction"]) == (42, 0.7)
