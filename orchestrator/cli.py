"""Command line:
  rl @ experiments/x.toml [@ more.toml] [--section.key VALUE ...]   run (--dry_run: print config + plan)
  rl export RUN_DIR OUT_DIR [--adapter-only]                         export the final student
  --resume continues from the latest complete checkpoint in output_dir; SIGTERM/SIGINT finish the step,
  write a checkpoint and exit with 128 + the signal number (143, 130).
"""

from __future__ import annotations

import sys


def _error(message: object) -> None:
    """One line on stderr, with any secret (an API key or token from the environment) redacted."""
    from shared.redact import redact_text

    print(f"error: {redact_text(' '.join(str(message).splitlines()))}", file=sys.stderr)


def _role_failure() -> type:
    from orchestrator.failures import RoleFailure

    return RoleFailure


def _interrupted() -> type:
    from orchestrator.launcher import Interrupted

    return Interrupted


def main(argv: list[str] | None = None) -> int:
    from shared.config import ConfigError, load, to_toml
    from shared.fsutil import WriteError
    from shared.metrics import TrainingStopped
    from shared.redact import redact_toml
    from shared.runtime import ray_env_defaults

    from orchestrator.launcher import loopback_env_defaults

    ray_env_defaults()  # before anything imports ray
    loopback_env_defaults()
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("  --dry_run checks the input as a run would (nothing started, written or downloaded) and prints every\n"
              "  key with its resolved value and the placement plan.")
        return 0
    if argv and argv[0] == "export":
        return _export(argv[1:])
    try:
        cfg = load(argv)
        if cfg.dry_run:
            import os

            from orchestrator.launcher import preflight
            from shared.placement import describe, plan

            run = preflight(cfg)  # every check of a real run that starts, writes and contacts nothing (DRY_RUN_SKIPS)
            print(redact_toml(to_toml(cfg)))
            print(describe(run.actors))
            return 0
        from orchestrator.api import run

        try:  # run() checks all of the user's input (preflight) before Ray or torch is even imported
            summary = run(cfg, progress=True).summary
        except ConfigError:
            raise
        except _role_failure() as e:  # evaluated only once something failed, so ray is imported only then
            _error(e)
            if e.detail:  # e.g. a hung actor's last log lines, below the one-line error
                from shared.redact import redact_text

                print("\n".join(f"  | {line}" for line in redact_text(e.detail).splitlines()), file=sys.stderr)
            return 1
        except TrainingStopped as e:
            _error(f"training stopped: {e}")
            return 1
        except WriteError as e:  # the disk filled up (or went away) during the run
            _error(e)
            return 1
        except _interrupted() as e:  # a second signal, or no checkpoint within ckpt.stop_timeout
            _error(e)
            return 128 + e.signum
    except ConfigError as e:
        _error(e)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if summary.get("stopped"):  # SIGTERM/SIGINT: the step in progress finished and a checkpoint was written
        import signal

        name = signal.Signals(summary["signal"]).name if summary.get("signal") else "a stop request"
        print(f"stopped by {name} after step {summary['steps']}; checkpoint: {cfg.output_dir}/checkpoints/"
              f"step_{summary['steps']}; continue with the same command and --resume", file=sys.stderr)
        return 128 + (summary.get("signal") or 15)
    from orchestrator.report import console_table

    print(console_table(cfg.output_dir))
    print(
        f"done: {summary['steps']} steps in {summary['wall_seconds']:.0f}s; "
        f"eval {summary['eval_start']:.3f} -> {summary['eval_end']:.3f}; report: {summary['report']}"
    )
    return 0


def _export(args: list[str]) -> int:
    from orchestrator.api import export_student
    from shared.config import ConfigError
    from shared.fsutil import WriteError

    adapter_only = "--adapter-only" in args or "--adapter_only" in args
    paths = [a for a in args if not a.startswith("--")]
    if len(paths) != 2 or len(paths) + adapter_only != len(args):
        print("error: usage: rl export RUN_DIR OUT_DIR [--adapter-only]", file=sys.stderr)
        return 2
    try:
        out = export_student(paths[0], paths[1], merged=not adapter_only)
    except ConfigError as e:
        _error(e)
        return 2
    except WriteError as e:
        _error(e)
        return 1
    print(f"exported {'adapter' if adapter_only else 'merged model'} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
