"""Writing command results: JSON files and the console the commands print to."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from rich.console import Console

from p2pml.report.results import JsonValue

__all__ = ["console", "write_json"]

console = Console(highlight=False)
if not console.is_terminal:
    console.width = 120  # piped output: do not squeeze tables into 80 columns


def write_json(path: Path, data: JsonValue) -> None:
    """Write `data` as JSON atomically: a temporary file in the same folder, then a rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or Path("."))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=1)
            handle.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
