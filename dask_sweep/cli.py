"""``dask-sweep``: the command line (``demo`` runs the main job on a generated volume)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``dask-sweep demo [--shape Z Y X] [--memory-limit 64MiB] ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: dask-sweep demo [options]   (dask-sweep demo --help for options)")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        from dask_sweep.demo import main as demo

        return demo(rest)
    print(f"dask-sweep: unknown command {cmd!r}; expected 'demo'", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
