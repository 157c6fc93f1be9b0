"""Command-line entry points: rapid-learner, rapid-actor, rapid-run, rapid-eval, rapid-plot,
rapid-tune, rapid-keys, rapid-replay.

`rapid-tune` has subcommands: report RUN_DIR, recommend, sweep.

Thin wrappers: parse arguments with typer, then import the heavy modules
(torch, transformers, vllm) so that `--help` is instant. Errors a user can fix
(bad config, no learner) print one clear line and exit with code 2.
`python -m rapid_async.cli learner|actor|run|plot ...` is the same as the
console scripts (the launcher starts its children that way).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Optional

import typer

CONFIG_HELP = "TOML run config (see configs/)."
SET_HELP = "Override a config field, e.g. --set learner.lr=3e-4 (repeatable)."


def _setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("RAPID_LOG", "INFO"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def learner(config: Optional[str] = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
            set_: list[str] = typer.Option([], "--set", help=SET_HELP),
            resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in run.run_dir."),
            model_dir: Optional[str] = typer.Option(None, "--model-dir", help="Model directory (default: model.path or the tiny model)."),
            devices: Optional[int] = typer.Option(None, "--devices", help="Learner ranks (GPUs on a GPU node, cores on CPU): > 1 starts torchrun and shards the model with FSDP2 (sets learner.devices)."),
            ) -> None:
    """Bind the learner's sockets and train (rapid-learner)."""
    from rapid_async.launch import apply_affinity_from_env

    apply_affinity_from_env()
    _setup_logging()
    from rapid_async.config import load_config
    from rapid_async.learner import distributed

    try:
        overrides = [*set_, *([f"learner.devices={devices}"] if devices else [])]
        cfg = load_config(config, overrides)
        if os.environ.get("RAPID_DEVICE") == "cuda":
            cfg.learner.device = "cuda"
        if distributed.needs_torchrun(cfg.learner.devices):
            args = [*(["--config", config] if config else []),
                    *[a for o in overrides for a in ("--set", o)],
                    *(["--resume"] if resume else []), *(["--model-dir", model_dir] if model_dir else [])]
            from rapid_async.learner.signals import stop_grace_s

            distributed.exec_torchrun(cfg.learner.devices, args, stop_grace_s(cfg))
        if distributed.is_follower():
            distributed.run_follower(cfg, model_dir)
            return
        from rapid_async.learner.loop import run_learner
        from rapid_async.learner.network import NoUsableGroups

        try:
            run_learner(cfg, resume=resume, model_dir=model_dir)
        except NoUsableGroups as exc:  # logged, end record written: no traceback
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(3)
    except ValueError as exc:
        _fail(str(exc))


def actor(learner: str = typer.Option("127.0.0.1:5555", "--learner", "-l", help="The learner's control endpoint, HOST:PORT or tcp://HOST:PORT (see RUN_DIR/learner.json)."),
          actor_id: Optional[str] = typer.Option(None, "--actor-id", help="Unique actor name (default: host-pid)."),
          engine: Optional[str] = typer.Option(None, "--engine", help="hf or vllm (default: the run config's actor.engine)."),
          evaluator: bool = typer.Option(False, "--evaluator", help="Only run the learner's held-out evaluations (no generation work); while one is connected, the other actors do not evaluate."),
          curve_secret_key: Optional[str] = typer.Option(None, "--curve-secret-key", help="This actor's CURVE secret key file (NAME.key_secret from rapid-keys; its NAME.key must be in the learner's transport.authorized_keys)."),
          curve_public_key: Optional[str] = typer.Option(None, "--curve-public-key", help="The learner's CURVE public key file (its transport.curve_public_key)."),
          ) -> None:
    """Connect to a learner, generate and send rollouts (rapid-actor)."""
    from rapid_async.launch import apply_affinity_from_env

    apply_affinity_from_env()
    _setup_logging()
    try:
        keys, server_key = _actor_curve(curve_secret_key, curve_public_key)
    except (ValueError, RuntimeError) as exc:
        _fail(str(exc))
    import torch

    if os.environ.get("RAPID_CPU_AFFINITY"):
        torch.set_num_threads(1)
    endpoint = learner if learner.startswith(("tcp://", "ipc://")) else f"tcp://{learner}"
    from rapid_async.actor.loop import Actor

    # SIGTERM like Ctrl-C: leave cleanly (the learner hands our work to others).
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        a = Actor(endpoint, actor_id=actor_id, engine=engine, evaluator=evaluator,
                  curve_keys=keys, server_key=server_key)
        if os.environ.get("RAPID_DEVICE") == "cuda":
            a.cfg.actor.device = "cuda"
        a.setup()
        reason = a.run()
    except (ValueError, TimeoutError) as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        typer.echo("[actor] interrupted: left the learner")
        return
    typer.echo(f"[actor {a.actor_id}] stopped: {reason}")


def _actor_curve(secret: str | None, public: str | None) -> tuple:
    """(key pair, learner's public key) from rapid-actor's flags, or (None, None)."""
    if bool(secret) != bool(public):
        raise ValueError("CURVE needs both --curve-secret-key (this actor's) and "
                         "--curve-public-key (the learner's)")
    if not secret:
        return None, None
    from rapid_async.wire.security import load_public_key, load_secret_key

    return (load_secret_key(secret, "--curve-secret-key"),
            load_public_key(public, "--curve-public-key"))


def keys(directory: str = typer.Argument(..., help="Where to write NAME.key and NAME.key_secret."),
         name: str = typer.Option("learner", "--name", help="File name of the pair, e.g. learner or actor-gpu3."),
         ) -> None:
    """Make a CURVE key pair for the learner or an actor (rapid-keys)."""
    from rapid_async.wire.security import write_key_pair

    try:
        public, secret = write_key_pair(directory, name)
    except (ValueError, RuntimeError, OSError) as exc:
        _fail(str(exc))
    typer.echo(f"public key: {public}\nsecret key: {secret} (mode 0600; keep it private)")
    typer.echo("learner: transport.curve_secret_key / curve_public_key = these files, "
               "transport.authorized_keys = the actors' .key files (a file or a directory); "
               "actor: rapid-actor --curve-secret-key ITS.key_secret --curve-public-key LEARNER.key")


def run(config: Optional[str] = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
        set_: list[str] = typer.Option([], "--set", help=SET_HELP),
        actors: Optional[int] = typer.Option(None, "--actors", "-n", help="Number of actors (default: one per free core or GPU)."),
        resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint."),
        learner_devices: Optional[int] = typer.Option(None, "--learner-devices", help="GPUs (cores on CPU) for the learner: > 1 runs it as torchrun ranks with FSDP2; the actors get the other devices (sets learner.devices)."),
        ) -> None:
    """Start a learner and N actors on this node and watch them (rapid-run)."""
    from rapid_async.launch import run_node

    try:
        code = run_node(config, set_, actors, resume=resume, learner_devices=learner_devices)
    except ValueError as exc:
        _fail(str(exc))
    raise typer.Exit(code)


def eval_(model: Optional[str] = typer.Option(None, "--model", "-m", help="Model directory to evaluate, e.g. RUN_DIR/checkpoints/step-N (default: model.path or the tiny model)."),
          task: Optional[str] = typer.Option(None, "--task", "-t", help="Task name (default: the config's task.name)."),
          n: int = typer.Option(8, "--n", help="Sampled completions per problem, for pass@k (0: greedy only)."),
          problems: Optional[int] = typer.Option(None, "--problems", help="Held-out problems (default: run.eval_size)."),
          k: list[int] = typer.Option([], "--k", help="Report pass@K (repeatable; default 1, 2, 4, ... and N)."),
          greedy: bool = typer.Option(True, "--greedy/--no-greedy", help="Also decode greedily (the learner's eval/success)."),
          engine: Optional[str] = typer.Option(None, "--engine", help="hf or vllm (default: the config's actor.engine)."),
          out: Optional[str] = typer.Option(None, "--out", "-o", help="Per-problem JSONL (default: evals/<task>-<model>.jsonl)."),
          config: Optional[str] = typer.Option(None, "--config", "-c", help=CONFIG_HELP + " Task options, prompt settings, temperature, max_new_tokens, seed and engine come from it."),
          set_: list[str] = typer.Option([], "--set", help=SET_HELP),
          ) -> None:
    """Evaluate a model on a task's held-out set: pass@1, pass@k, greedy success (rapid-eval)."""
    _setup_logging()
    from pathlib import Path

    from rapid_async.config import load_config

    overrides = list(set_)
    if task:
        overrides.append(f"task.name={task}")
    if engine:
        overrides.append(f"actor.engine={engine}")
    try:
        cfg = load_config(config, overrides)
        if os.environ.get("RAPID_DEVICE") == "cuda":
            cfg.actor.device = "cuda"
        from rapid_async.evaluate import evaluate_model, settings_from_config, summary_line
        from rapid_async.learner.startup import resolve_model_dir

        if model:
            cfg.model.path = model
        model_dir = resolve_model_dir(cfg)
        settings = settings_from_config(cfg, samples=n, problems=problems, greedy=greedy,
                                        ks=tuple(k) or None)
        path = Path(out or f"evals/{cfg.task.name}-{Path(model_dir).name}.jsonl")
        report = evaluate_model(cfg, model_dir, settings, path)
    except ValueError as exc:
        _fail(str(exc))
    typer.echo(summary_line(report.summary))
    typer.echo(f"per-problem records: {path}")


def plot(run_dir: str = typer.Argument(..., help="A run directory with metrics.jsonl."),
         out: Optional[str] = typer.Option(None, "--out", help="PNG path (default RUN_DIR/plots.png)."),
         ) -> None:
    """Draw a run's metrics as PNG plots (rapid-plot)."""
    from rapid_async.metrics import plot_run

    try:
        typer.echo(str(plot_run(run_dir, out)))
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))


def replay(run_dir: str = typer.Argument(..., help="A run directory recorded with learner.record_replay (RUN_DIR/replay/)."),
           quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the result."),
           ) -> None:
    """Retrain a run offline from its record and check each version's weights (rapid-replay).

    Exit code 0 when every version's weight digests equal the run's, 1 at the
    first difference (its version and tensor are printed), 2 on bad input.
    """
    from rapid_async.replay import replay_run

    try:
        result = replay_run(run_dir, progress=None if quiet else typer.echo)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    if result.ok:
        typer.echo(f"replayed {result.steps} steps of {run_dir}: versions {result.versions[0]}.."
                   f"{result.versions[-1]} match the run bit for bit ({result.seconds:.1f} s)")
        return
    typer.echo(f"replay FAILED at version {result.version}: {result.mismatch}", err=True)
    raise typer.Exit(1)


tune_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                       help="Measure what limits a run, predict and recommend settings (rapid-tune).")


@tune_app.command("report")
def tune_report(run_dir: str = typer.Argument(..., help="A run directory with metrics.jsonl and config.toml."),
                top: int = typer.Option(5, "--top", help="How many ranked changes to show."),
                ) -> None:
    """Which role limits a run, why (in numbers), and what would move it."""
    from rapid_async.tune.report import report_text

    try:
        typer.echo(report_text(run_dir, top=top))
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))


@tune_app.command("recommend")
def tune_recommend(
        config: Optional[str] = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
        set_: list[str] = typer.Option([], "--set", help=SET_HELP + " Applied to every trial."),
        budget_s: float = typer.Option(150.0, "--budget-s", help="Training seconds of all trials together (2 calibration trials 30% each, verification 40%); with --steps, the most each trial may take."),
        steps: Optional[int] = typer.Option(None, "--steps", help="Each trial stops after this many updates (default: trials share --budget-s)."),
        actors: Optional[int] = typer.Option(None, "--actors", "-n", help="Actors of the config as given (default as rapid-run)."),
        root: str = typer.Option("runs/recommend", "--root", help="Where the trial runs and results go."),
        out: Optional[str] = typer.Option(None, "--out", help="TOML file of the recommended config (default ROOT/recommended.toml)."),
        max_mean_staleness: float = typer.Option(3.0, help="Highest predicted mean staleness (versions)."),
        max_truncated: float = typer.Option(0.05, help="Highest predicted truncated-weight fraction."),
        max_dropped: float = typer.Option(0.2, help="Highest predicted fraction of groups dropped as stale."),
        min_minibatch_groups: int = typer.Option(0, help="Smallest mini-batch to consider (0: a quarter of the config's)."),
        max_actors: int = typer.Option(0, help="Most actors to consider (0: devices + 1)."),
        verify: bool = typer.Option(True, "--verify/--no-verify", help="Run the recommended setting and compare."),
) -> None:
    """Calibration trials, the cost model's best setting under the rules, a verification trial."""
    from pathlib import Path

    from rapid_async.tune.recommend import Rules, recommend

    rules = Rules(max_mean_staleness=max_mean_staleness, max_truncated=max_truncated,
                  max_dropped=max_dropped, min_minibatch_groups=min_minibatch_groups,
                  max_actors=max_actors)
    try:
        recommend(config, budget_s, Path(root), actors=actors, fixed=set_, rules=rules,
                  verify=verify, out=Path(out) if out else None, steps=steps)
    except (ValueError, RuntimeError) as exc:
        _fail(str(exc))


@tune_app.command("sweep")
def tune_sweep(config: Optional[str] = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
               grid: list[str] = typer.Option([], "--grid", help="A setting to vary, e.g. --grid learner.max_staleness=1,2,4 or --grid actors=1,2 (repeatable; all combinations are tried)."),
               set_: list[str] = typer.Option([], "--set", help=SET_HELP + " Applied to every trial."),
               budget_s: float = typer.Option(60.0, "--budget-s", help="Training seconds per trial (with --steps: the most a trial may take)."),
               steps: Optional[int] = typer.Option(None, "--steps", help="Each trial stops after this many updates (default: at --budget-s)."),
               actors: Optional[int] = typer.Option(None, "--actors", "-n", help="Actors per trial (default as rapid-run)."),
               root: str = typer.Option("runs/tune", "--root", help="Where the trial runs and results go."),
               eval_every: int = typer.Option(0, "--eval-every", help="Held-out evaluation every N steps in each trial (0: start and end)."),
               ) -> None:
    """Short trials over a grid of settings: table, CSV, JSON and PNG plots."""
    from pathlib import Path

    from rapid_async.tune.sweep import sweep

    try:
        sweep(config, grid, budget_s, Path(root), actors=actors, fixed=set_, eval_every=eval_every,
              max_steps=steps)
    except (ValueError, RuntimeError) as exc:
        _fail(str(exc))


def tune_main() -> None:
    """rapid-tune; `rapid-tune --grid ...` (no subcommand) still means `sweep`."""
    args = sys.argv[1:]
    if args and args[0] not in ("report", "recommend", "sweep", "--help", "-h",
                                "--install-completion", "--show-completion"):
        sys.argv.insert(1, "sweep")
    tune_app(prog_name="rapid-tune")


def _single(fn):
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(fn)
    return app


learner_main = _single(learner)
actor_main = _single(actor)
run_main = _single(run)
plot_main = _single(plot)
eval_main = _single(eval_)
keys_main = _single(keys)
replay_main = _single(replay)

_COMMANDS = {"learner": learner_main, "actor": actor_main, "run": run_main, "plot": plot_main,
             "tune": tune_main, "eval": eval_main, "keys": keys_main, "replay": replay_main}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in _COMMANDS:
        print(f"usage: python -m rapid_async.cli {{{','.join(_COMMANDS)}}} ...", file=sys.stderr)
        sys.exit(2)
    name = sys.argv.pop(1)
    sys.argv[0] = f"rapid-{name}"
    _COMMANDS[name]()
