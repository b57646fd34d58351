"""A real Tiled server for the tests, run by the interpreter of ``.venv-tiled`` (its
server needs about 1 GB of packages the daemon never does): ``SimpleTiledServer`` on
127.0.0.1 with an API key, serving external files only from ``--readable``. Prints its
base URI, then serves until stdin closes.

    .venv-tiled/bin/python tests/helpers/tiled_server.py --dir D --readable R --api-key K [--port N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tiled.server import SimpleTiledServer


def main() -> None:
    """Serve until stdin closes."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--readable", type=Path, required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    args.readable.mkdir(parents=True, exist_ok=True)
    with SimpleTiledServer(
        directory=args.dir, api_key=args.api_key, port=args.port, readable_storage=[args.readable]
    ) as server:
        print(server.uri.split("?")[0], flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
