"""Runs the service on a loopback port over the fake embedder (reliability and browser tests).

    python server_worker.py HOME PORT [--delay S] [--group N] [--fake-mm]

``--delay`` slows each embedding call, so a test can kill the server mid-ingest;
``--fake-mm`` serves images through ``serverkit.FakeMultimodal``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LANCE_LOG", "error")

_spec = importlib.util.spec_from_file_location(
    "aiprime_tests_conftest", Path(__file__).resolve().parents[1] / "conftest.py"
)
assert _spec and _spec.loader
_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_conftest)
sys.path.insert(0, str(Path(__file__).resolve().parent))
import serverkit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("home")
    ap.add_argument("port", type=int)
    ap.add_argument("--delay", type=float, default=0.0)
    ap.add_argument("--group", type=int, default=16)
    ap.add_argument("--fake-mm", action="store_true")
    a = ap.parse_args()

    import uvicorn

    from aiprime.config import load_settings
    from aiprime.server import create_app

    factory = serverkit.fake_factory(_conftest.FakeEmbedder, a.delay)
    s = load_settings(
        a.home,
        serve={"allow_no_auth": True, "ingest_group_files": a.group, "port": a.port},
        rerank={"stack": []},
        store={"read_consistency_s": 0.0},
    )
    mm = serverkit.FakeMultimodal() if a.fake_mm else None
    app = create_app(s, factory, multimodal=mm)
    uvicorn.run(app, host="127.0.0.1", port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
