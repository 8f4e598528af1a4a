"""What every ``mergenet`` command shares: the program's name, the exit code of a user-fixable
problem, and how such a problem is printed (one line each, never a traceback)."""
from __future__ import annotations

import sys

PROG = "mergenet"  # the program's name: argparse prog= and the resume commands it prints

EXIT_USAGE = 2

#: an error line never grows past this (it may quote a short prefix of a value, never all of it)
MAX_LINE = 400


def fail(lines: list[str], prefix: str = "") -> int:
    from mergenet_core.errors import short

    for line in lines:
        if prefix and line.startswith(prefix):  # the message already names the file
            line = line[len(prefix):]
        print(short(f"error: {prefix}{line}", MAX_LINE), file=sys.stderr)
    return EXIT_USAGE


def print_section(args, text: str) -> int:
    """Print a command-written section, and write it into ``--results-md`` when given."""
    from orchestrator.tracking.publish import write_section

    print(text)
    if args.results_md:
        write_section(args.results_md, args.section, text)
        print(f"section '{args.section}' of {args.results_md}")
    return 0
