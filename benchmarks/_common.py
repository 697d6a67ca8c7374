"""Shared by the benchmark scripts: one way to record and show a result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_results(out: dict[str, Any], path: Path) -> None:
    """Write ``out`` as JSON to ``path`` and print it as an aligned table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    for k, v in out.items():
        print(f"{k:32s} {v}")
    print(f"wrote {path}")
