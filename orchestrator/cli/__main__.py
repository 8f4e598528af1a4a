"""``python -m orchestrator.cli``: the ``mergenet`` command."""
import sys

from orchestrator.cli import main

sys.exit(main())
