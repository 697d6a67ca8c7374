"""Headless matplotlib for the report and evaluation plots (an optional extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot(what: str) -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or a clear error naming ``what`` needs it."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(f"{what} needs matplotlib: pip install 'aiprime[plots]'") from None
    matplotlib.use("Agg")  # no display needed; must precede pyplot's first import
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: Path, **savefig: Any) -> Path:
    """Write ``fig`` to ``path`` (creating its folder) and free it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, **savefig)
    plt.close(fig)
    return path
