"""The service's view of multimodal search: index images, search them by text or image.

``aiprime.multimodal`` (a trained dual encoder and its image collection,
``settings.mm.collection``) is optional: when the package or a trained model is missing,
``load_multimodal`` returns None and says why, and the service still validates image
uploads but answers 501 with that reason.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Protocol

from aiprime.config import Settings
from aiprime.rag.ingest import IngestReport
from aiprime.rag.loaders import LoadError
from aiprime.store import Hit

log = logging.getLogger("aiprime.server")


class MultimodalBackend(Protocol):
    """What the service needs; errors the user can fix are ValueError (bad image) or
    StoreError (collection/model mismatch)."""

    def index_images(self, collection: str, paths: list[Path]) -> IngestReport: ...

    def search_text(self, query: str, k: int) -> list[Hit]: ...

    def search_image(self, data: bytes, suffix: str, k: int) -> list[Hit]: ...


def model_dir(settings: Settings) -> Path:
    mm: Any = settings.mm
    return Path(getattr(mm, "model", None) or settings.models_dir / "mm")


def unavailable_reason(settings: Settings) -> str | None:
    """None when multimodal search can be served, else the reason, for the 501 message."""
    try:
        from aiprime.multimodal.search import MultimodalIndex  # noqa: F401
    except ImportError as e:
        return f"the aiprime.multimodal package cannot be imported ({e})"
    d = model_dir(settings)
    if not d.is_dir() or not any(d.iterdir()):
        return f"no trained image model in {d} (train one with `aiprime mm train`)"
    return None


def load_multimodal(settings: Settings) -> MultimodalBackend | None:
    if unavailable_reason(settings) is not None:
        return None
    return IndexBackend(settings)


class IndexBackend:
    """``aiprime.multimodal.search.MultimodalIndex`` behind the service's interface."""

    def __init__(self, settings: Settings) -> None:
        from aiprime.multimodal.search import MultimodalIndex

        self._index = MultimodalIndex(settings, model_dir(settings))
        self._lock = threading.Lock()
        self._ready = False

    def _idx(self) -> Any:
        # Load the model and open the collection once, not racing in request threads.
        with self._lock:
            if not self._ready:
                self._index.store  # noqa: B018
                self._ready = True
        return self._index

    def index_images(self, collection: str, paths: list[Path]) -> IngestReport:
        """One incremental index call per group: a folder of links to the group's images
        (the index resolves them, so sources are the uploaded files themselves)."""
        idx = self._idx()
        tmp = Path(tempfile.mkdtemp(prefix="aiprime-mm-"))
        try:
            for p in paths:
                os.symlink(p.resolve(), tmp / p.name)
            rep = idx.index(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        out = IngestReport(
            files_seen=len(paths),
            files_ingested=rep.images_indexed,
            files_unchanged=rep.images_unchanged,
            chunks_written=rep.images_indexed + rep.captions_indexed,
        )
        for e in rep.errors:
            where, _, reason = str(e).partition(": ")
            out.errors.append(LoadError(Path(where).name, reason or "unreadable image"))
        return out

    def search_text(self, query: str, k: int) -> list[Hit]:
        return list(self._idx().search_text(query, k, "image"))

    def search_image(self, data: bytes, suffix: str, k: int) -> list[Hit]:
        from aiprime.multimodal.images import ImageLoadError

        idx = self._idx()
        with tempfile.NamedTemporaryFile(suffix=suffix) as f:
            f.write(data)
            f.flush()
            try:
                return list(idx.search_image(Path(f.name), k, "image"))
            except ImageLoadError as e:
                raise ValueError(f"image: {str(e).partition(': ')[2] or e}") from e
