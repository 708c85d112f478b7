"""The ``slim`` command. Torch-free: ``slim run`` execs into ``python -m slimcore`` so this process (and
the API it can start) never imports torch, and client commands start instantly.
"""

from __future__ import annotations

import os
import sys

USAGE = """usage: slim <command> [options]

commands:
  run MODEL --spec SPEC.json --data DATA -o OUT [--report REPORT.json]   the whole pipeline locally
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    cmd = argv[0]
    if cmd == "run":
        os.execv(sys.executable, [sys.executable, "-m", "slimcore", *argv])
    print(f"slim: error: unknown command {cmd!r}\n{USAGE}", file=sys.stderr, end="")
    return 2


if __name__ == "__main__":
    sys.exit(main())
