"""Optional metric backends beside metrics.jsonl: TensorBoard and Weights & Biases.

Used by the learner and actor processes through `metrics.MetricsWriter`, when
the run config asks for them (`[metrics] backends = "tensorboard,wandb"`);
the quickstart needs neither. Each process logs its own numeric fields:

- "tensorboard": event files under RUN_DIR/tensorboard/<role or actor id>
  (torch.utils.tensorboard, which needs the `tensorboard` package);
  `tensorboard --logdir RUN_DIR/tensorboard` shows learner and actors together.
- "wandb": one W&B run per process, grouped by the run directory's name, with
  the run config attached (needs the `wandb` package, and `wandb login` or
  `metrics.wandb_mode = "offline"`).

The x axis is the learner's optimizer step; an actor's records are numbered in
order. Histograms (`staleness/hist`) are logged as one scalar per bucket.
A backend that fails while logging is reported once and then left out, so a
dashboard problem never stops training.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("rapid.metrics")

BACKENDS = ("tensorboard", "wandb")
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def parse_backends(text: str) -> list[str]:
    """'tensorboard, wandb' -> ['tensorboard', 'wandb'] (raises ValueError on unknown names)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        if n not in BACKENDS:
            raise ValueError(f"metrics.backends: {n!r} is not one of {', '.join(BACKENDS)}")
    return names


def missing_package(name: str) -> str | None:
    """The pip package a backend needs when it is not installed, else None."""
    package = _PACKAGES[name]
    return None if importlib.util.find_spec(package) is not None else package


def scalars(rec: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of a record, histograms flattened to one value per bucket."""
    out: dict[str, float] = {}
    for k, v in rec.items():
        if k in ("time", "step"):
            continue
        if isinstance(v, bool):
            out[k] = float(v)
        elif isinstance(v, (int, float)):
            out[k] = float(v)
        elif isinstance(v, dict):
            for sub, x in v.items():
                if isinstance(x, (int, float)) and not isinstance(x, bool):
                    out[f"{k}/{sub}"] = float(x)
    return out


class TensorBoardBackend:
    """Scalars to TensorBoard event files in `logdir`."""

    def __init__(self, logdir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(logdir))

    def write(self, rec: dict[str, Any], step: int) -> None:
        for k, v in scalars(rec).items():
            self.writer.add_scalar(k, v, global_step=step, walltime=rec.get("time"))

    def close(self) -> None:
        self.writer.close()


class WandbBackend:
    """Scalars to one Weights & Biases run."""

    def __init__(self, cfg: Any, run_dir: Path, name: str, role: str):
        import wandb

        m = cfg.metrics
        self.run = wandb.init(project=m.wandb_project, entity=m.wandb_entity or None,
                              group=run_dir.resolve().name, name=name, job_type=role,
                              dir=str(run_dir), config=cfg.to_dict(),
                              mode=m.wandb_mode or None, reinit="create_new")

    def write(self, rec: dict[str, Any], step: int) -> None:
        self.run.log(scalars(rec), step=step)

    def close(self) -> None:
        self.run.finish()


def open_backends(cfg: Any, run_dir: str | Path, name: str, role: str) -> list[Any]:
    """The backends the config asks for, opened for one process named `name`.

    Raises:
        ValueError: naming the backend and the package to install when it is missing.
    """
    run_dir = Path(run_dir)
    out: list[Any] = []
    for backend in parse_backends(cfg.metrics.backends):
        package = missing_package(backend)
        if package:
            raise ValueError(f"metrics.backends includes {backend!r} but the {package!r} "
                             f"package is not installed: pip install {package}, or remove it")
        if backend == "tensorboard":
            out.append(TensorBoardBackend(run_dir / "tensorboard" / name))
        else:
            out.append(WandbBackend(cfg, run_dir, name, role))
    return out
