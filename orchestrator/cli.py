"""Command line:
  rl @ experiments/x.toml [@ more.toml] [--section.key VALUE ...]   run (--dry_run: print config + plan)
  rl export RUN_DIR OUT_DIR [--adapter-only]                         export the final student
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from shared.config import ConfigError, load, to_toml
    from shared.runtime import ray_env_defaults

    ray_env_defaults()  # before anything imports ray
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("  --dry_run prints every key with its resolved value and the placement plan.")
        return 0
    if argv and argv[0] == "export":
        return _export(argv[1:])
    try:
        cfg = load(argv)
        if cfg.dry_run:
            from shared.placement import describe, plan

            print(to_toml(cfg))
            print(describe(plan(cfg)))
            return 0
        from orchestrator.launcher import launch
        from orchestrator.orchestrator import RoleFailure

        try:
            summary = launch(cfg)
        except RoleFailure as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    from orchestrator.report import console_table

    print(console_table(cfg.output_dir))
    print(
        f"done: {summary['steps']} steps in {summary['wall_seconds']:.0f}s; "
        f"eval {summary['eval_start']:.3f} -> {summary['eval_end']:.3f}; report: {summary['report']}"
    )
    return 0


def _export(args: list[str]) -> int:
    from orchestrator.export import export_student
    from shared.config import ConfigError

    adapter_only = "--adapter-only" in args or "--adapter_only" in args
    paths = [a for a in args if not a.startswith("--")]
    if len(paths) != 2 or len(paths) + adapter_only != len(args):
        print("error: usage: rl export RUN_DIR OUT_DIR [--adapter-only]", file=sys.stderr)
        return 2
    try:
        out = export_student(paths[0], paths[1], merged=not adapter_only)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {'adapter' if adapter_only else 'merged model'} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
