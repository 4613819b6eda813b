"""`kubectl-workorder`: the kubectl plugin (`kubectl workorder ...`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from workorder_operator import __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubectl workorder", description="Work with WorkOrders.")
    parser.add_argument("--version", action="version", version=f"kubectl-workorder {__version__}")
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
