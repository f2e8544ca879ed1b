"""Command line:
  rl @ experiments/x.toml [@ more.toml] [--section.key VALUE ...]   run (--dry_run: print config + plan)
  rl export RUN_DIR OUT_DIR [--adapter-only]                         export the final student
  --resume continues from the latest complete checkpoint in output_dir; SIGTERM/SIGINT finish the step,
  write a checkpoint and exit with 128 + the signal number (143, 130).
"""

from __future__ import annotations

import os
import sys

RELAY_ENV = "OPD_RL_RELAY"  # set in the run's own process: the pid of the relay that started it
RELAY_ONCE_S = 1.0  # the same signal again within this many seconds is the same request (see _relay)


def _relay(argv: list[str]) -> int:
    """Run ``rl`` in a child process of its own process group and pass every stop signal on to it alone.

    A signal sent to a whole process group (Ctrl-C in a terminal, ``timeout``, ``kill -- -PGID``) would otherwise
    also reach Ray's GCS and raylet, which share rl's group: they exit at once, and the run ends with "Failed to
    connect to GCS" or an actor error instead of finishing its step and writing a checkpoint. Here the group holds only this relay (and
    its parents): the run and everything it starts live in a group no such signal reaches, and the relay hands
    SIGTERM, SIGINT (and SIGHUP, as SIGTERM) to the run, which stops as documented above; the same signal twice
    within ``RELAY_ONCE_S`` is passed on once (``timeout`` signals the whole group and ``uv run`` passes its own
    copy on: one request, where a second signal would mean "stop at once, without a checkpoint"). If the relay
    itself is killed, the kernel sends the run SIGTERM (``PR_SET_PDEATHSIG``), which stops it the same way."""
    import signal
    import subprocess
    import time
    from pathlib import Path

    child: subprocess.Popen | None = None
    last: dict[int, float] = {}

    def forward(signum: int, frame: object) -> None:
        sig = signal.SIGTERM if signum == signal.SIGHUP else signum
        now = time.monotonic()
        if now - last.get(sig, float("-inf")) < RELAY_ONCE_S:  # one stop sent twice at once: `timeout uv run rl`
            return  # (timeout signals the group, uv passes its copy on), which must not count as a second signal
        last[sig] = now
        if child is None:  # not started yet: it sees its relay gone or this signal's twin (_end_with_relay)
            return
        try:
            child.send_signal(sig)
        except OSError:  # it has just ended
            pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        if signal.getsignal(sig) is not signal.SIG_IGN:  # `nohup rl ...` (SIGHUP), `rl ... &` in a script (SIGINT)
            signal.signal(sig, forward)
    # the child imports this checkout's code whatever the working directory holds (-P: not the cwd first)
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, RELAY_ENV: str(os.getpid()),
           "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}
    try:  # stdin: nothing reads it, and a read from a terminal by a background group would stop the run
        child = subprocess.Popen([sys.executable, "-P", "-m", "orchestrator.cli", *argv], env=env, process_group=0,
                                 stdin=subprocess.DEVNULL if sys.stdin is not None and sys.stdin.isatty() else None)
    except OSError as e:
        _error(f"cannot start the run's process: {e}")
        return 1
    rc = child.wait()
    return 128 - rc if rc < 0 else rc  # killed by signal N: 128 + N, as a shell reports it


def _end_with_relay() -> None:
    """In the run's process (see :func:`_relay`): SIGTERM when the relay dies, so a killed ``rl`` still stops
    its run (checkpoint, Ray shut down) rather than leaving it running unseen. The mark is removed from the
    environment, so that nothing the run starts (Ray's processes, another ``rl``) inherits it."""
    import ctypes
    import signal

    relay = os.environ.pop(RELAY_ENV)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the relay's own forwarding is all there is
        return
    if str(os.getppid()) != relay:  # the relay died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


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
    relayed = argv is None and os.name == "posix"  # the `rl` command (not a call from Python: tests, notebooks)
    argv = sys.argv[1:] if argv is None else argv
    if relayed and not (argv and argv[0] in ("-h", "--help", "export")):
        if RELAY_ENV not in os.environ:
            return _relay(argv)
        _end_with_relay()
    if argv and argv[0] in ("-h", "--help"):
        try:
            print(__doc__.strip())
            print("  --dry_run checks the input as a run would (nothing started, written or downloaded) and prints every\n"
                  "  key with its resolved value and the placement plan.", flush=True)
        except BrokenPipeError:  # `rl --help | head -1`
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0
    if argv and argv[0] == "export":
        return _export(argv[1:])
    try:
        cfg = load(argv)
        if cfg.dry_run:
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
