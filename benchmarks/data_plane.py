"""Wire-format and data-plane speed against baselines from the same run (DESIGN.md section 7).

Runs ``p2pml bench codec`` (encode and decode against ``ndarray.copy()``) and ``p2pml bench
transport`` (a push between two processes on 127.0.0.1 against an asyncio ``BufferedProtocol``
receiver, 15 interleaved pairs), each printing its table:

    python benchmarks/data_plane.py [--size-mb 1,16,256] [--json-dir DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from p2pml.cli import main as p2pml


def run() -> int:
    parser = argparse.ArgumentParser(description="p2pml data-plane benchmark")
    parser.add_argument("--size-mb", default="1,16,256")
    parser.add_argument("--json-dir", type=Path)
    args = parser.parse_args()
    for command in ("codec", "transport"):
        argv = ["bench", command, "--size-mb", args.size_mb]
        if args.json_dir is not None:
            args.json_dir.mkdir(parents=True, exist_ok=True)
            argv += ["--json", str(args.json_dir / f"{command}.json")]
        status = p2pml(argv)
        if status != 0:
            return status
    return 0


if __name__ == "__main__":
    sys.exit(run())
