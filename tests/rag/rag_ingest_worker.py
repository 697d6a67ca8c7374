"""A separate process that ingests files with the fake embedder (crash and concurrency tests).

    python rag_ingest_worker.py HOME PATH... [--delay S] [--batch-chunks N]
        [--progress FILE] [--die-after-add K]

``--progress`` gets one line per committed write batch; ``--die-after-add K`` SIGKILLs
this process right after the K-th batch's ``add`` commits, before its ``delete``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "aiprime_tests_conftest", Path(__file__).resolve().parents[1] / "conftest.py"
)
assert _spec and _spec.loader
_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_conftest)

from aiprime.rag.chunking import Chunker  # noqa: E402
from aiprime.rag.ingest import Ingestor  # noqa: E402
from aiprime.store.lance import LanceStore  # noqa: E402

CHUNK_SIZE, CHUNK_OVERLAP = 50, 5


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("home")
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--delay", type=float, default=0.0)
    ap.add_argument("--batch-chunks", type=int, default=4096)
    ap.add_argument("--progress")
    ap.add_argument("--die-after-add", type=int, default=0)
    a = ap.parse_args()

    emb = _conftest.FakeEmbedder(delay_s=a.delay)
    store = LanceStore(Path(a.home) / "store", "default", emb.dim, emb.model_id)
    orig = LanceStore.replace_sources
    batches = 0

    def replace_sources(self, records, sources):  # type: ignore[no-untyped-def]
        nonlocal batches
        batches += 1
        if batches == a.die_after_add:
            self._ensure_table().add(self._to_arrow(records))
            os.kill(os.getpid(), signal.SIGKILL)
        orig(self, records, sources)
        if a.progress:
            with open(a.progress, "a") as fh:
                fh.write(f"{batches}\n")

    LanceStore.replace_sources = replace_sources  # type: ignore[method-assign]
    chunker = Chunker(emb.count_tokens, CHUNK_SIZE, CHUNK_OVERLAP)
    report = Ingestor(store, emb, chunker, batch_chunks=a.batch_chunks).ingest(
        [Path(p) for p in a.paths]
    )
    print(f"ingested={report.files_ingested} errors={len(report.errors)}")


if __name__ == "__main__":
    main()
