"""``mergenet`` command line.

Every user-fixable problem (bad config, missing data) ends with exit code 2 and one line per
problem on stderr, never a traceback. Configs are validated before any Ray or MLflow work.
The commands live by what they work on: :mod:`.pair` (validate, train, pairs), :mod:`.grid` (run,
report, summary, overlap), :mod:`.jobs` (submit, status, logs, stop); :mod:`.parser` builds the
argument parser.
"""
from __future__ import annotations

import os
import sys

from mergenet_core.errors import MergenetError

from .common import EXIT_USAGE, MAX_LINE, PROG, fail

__all__ = ["EXIT_USAGE", "MAX_LINE", "PROG", "main"]


def main(argv: list[str] | None = None) -> int:
    from .parser import build_parser

    p = build_parser(__doc__.splitlines()[0].replace("``", ""))
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported: no INFO lines
    if args.cmd == "run" and not (args.address or os.environ.get("RAY_ADDRESS")):
        # a local Ray started by this process: token authentication, the mode a new local Ray picks
        # anyway, set explicitly (Ray then does not warn that it picked it). Ray reads it on import.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    try:
        return args.fn(args)
    except MergenetError as e:
        from mergenet_core.config import ConfigErrors

        return fail(e.lines if isinstance(e, ConfigErrors) else [str(e)])
    except KeyboardInterrupt as e:  # orchestrator/interrupts.py: one closing line, 130 (SIGINT) / 143 (SIGTERM)
        from orchestrator.interrupts import Interrupted

        if isinstance(e, Interrupted):
            _quiet_ray_before_closing()
            print(e.closing_line(), flush=True)
            return e.exit_code
        print("interrupted (SIGINT)", file=sys.stderr)
        return 130
    finally:
        from orchestrator import interrupts

        interrupts.uninstall()


def _quiet_ray_before_closing() -> None:
    """Disconnect from Ray before the closing line: Ray forwards what its worker processes print
    to this console from a thread, and a trial process stopped by the interrupt may still print
    (a fatal-error dump as Tune force-kills it). After ``ray.shutdown`` nothing more is forwarded,
    so the closing line is the last line (and a local Ray started here is gone, as at exit)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        try:
            ray.shutdown()
        except Exception:  # noqa: BLE001 - the closing line and exit code matter more
            pass

