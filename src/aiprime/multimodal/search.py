"""Cross-modal search over the aiprime store: text->image, image->text, image->image.

Images (and their captions, when a captions file sits beside them) are embedded with a
trained dual encoder into one LanceDB collection (``settings.mm.collection``) of the same
store directory the RAG knowledge base uses. Each image file is one *source* whose rows
are the image (``modality = "image"``) and its caption (``"text"``), so the store's
per-source replacement, crash repair and incremental skipping (unchanged SHA-256) apply
exactly as for documents. The collection records the model id: vectors of another model
are refused rather than silently compared.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from aiprime.config import Settings
from aiprime.multimodal.augment import to_float
from aiprime.multimodal.images import ImageLoadError, find_images, load_batch
from aiprime.multimodal.model import DualEncoder, load_model, model_id
from aiprime.store import ChunkRecord, Hit, LanceStore
from aiprime.store.lance import sql_str

Modality = str  # "image" or "text"


@dataclass
class IndexReport:
    images_indexed: int = 0
    images_unchanged: int = 0
    captions_indexed: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _captions_for(root: Path, model_dir: Path) -> dict[Path, str]:
    """Captions by image path, from a captions file in ``root`` read with the column
    settings the model was trained with (else the defaults); an unreadable or absent file
    just means images are indexed without captions."""
    from aiprime.multimodal.data import DataConfig, DataError, load_pairs
    from aiprime.multimodal.model import read_meta

    try:
        cfg = DataConfig(**read_meta(model_dir).get("data", {}))
    except (OSError, ValueError):
        cfg = DataConfig()
    try:
        return {p.image.resolve(): p.caption for p in load_pairs(root, cfg)}
    except (DataError, OSError, KeyError, ValueError):
        return {}


class MultimodalIndex:
    """The Python API behind ``aiprime mm index`` and ``aiprime search --image/--modality``."""

    def __init__(self, settings: Settings, model_dir: Path | None = None) -> None:
        self.settings = settings
        self.model_dir = Path(model_dir or settings.mm.model or settings.models_dir / "mm")
        self._model: DualEncoder | None = None
        self._store: LanceStore | None = None

    @property
    def model(self) -> DualEncoder:
        if self._model is None:
            self._model = load_model(self.model_dir)
        return self._model

    @property
    def store(self) -> LanceStore:
        if self._store is None:
            self._store = LanceStore(
                self.settings.store_dir,
                self.settings.mm.collection,
                dim=self.model.embed_dim,
                model_id=model_id(self.model_dir),
                read_consistency_s=self.settings.store.read_consistency_s,
                ann_min_rows=self.settings.store.ann_min_rows,
            )
        return self._store

    def reset(self) -> bool:
        """Drop the collection (whatever model filled it): needed after retraining, since
        vectors of two models must not be mixed. Returns whether there was one."""
        from aiprime.store import StoreError

        name = self.settings.mm.collection
        try:
            old = LanceStore(self.settings.store_dir, name)  # opens with its own meta
        except StoreError:
            return False
        with old.write_lock():
            if old.table is not None:
                old.db.drop_table(name)
            old._meta_path.unlink(missing_ok=True)
        self._store = None
        return True

    # -- embedding ----------------------------------------------------------------------
    @torch.no_grad()
    def embed_images(
        self, paths: Sequence[Path]
    ) -> tuple[np.ndarray, list[int], list[ImageLoadError]]:
        """Vectors of the images that load, their indices in ``paths``, and the errors."""
        m = self.model
        vecs: list[np.ndarray] = []
        kept: list[int] = []
        errors: list[ImageLoadError] = []
        bs = self.settings.mm.batch_size
        for s in range(0, len(paths), bs):
            lb = load_batch(paths[s : s + bs], m.image_size, self.settings.mm.max_image_pixels)
            errors.extend(lb.errors)
            if lb.indices:
                vecs.append(m.encode_image(to_float(torch.from_numpy(lb.pixels))).numpy())
                kept.extend(s + i for i in lb.indices)
        arr = np.concatenate(vecs) if vecs else np.zeros((0, m.embed_dim), np.float32)
        return arr.astype(np.float32), kept, errors

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        m = self.model
        out = [m.encode_text(texts[s : s + 256]).numpy() for s in range(0, len(texts), 256)]
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, m.embed_dim))

    # -- indexing -----------------------------------------------------------------------
    def index(self, root: Path, progress: Callable[[int, int], None] | None = None) -> IndexReport:
        """Embed new or changed images under ``root`` (and their captions); unchanged
        files are skipped, bad images reported and skipped."""
        t0 = time.time()
        rep = IndexReport()
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"{root}: no such file or directory")
        paths = [p.resolve() for p in find_images(root)]
        captions = (
            _captions_for(root, self.model_dir)
            if root.is_dir() and self.settings.mm.index_captions
            else {}
        )
        store = self.store
        with store.write_lock():
            store.repair()
            known = store.sources()
            todo: list[tuple[Path, str]] = []
            for p in paths:
                h = _sha256(p)
                if p.as_posix() in known and known[p.as_posix()].source_hash == h:
                    rep.images_unchanged += 1
                else:
                    todo.append((p, h))
            bs = max(self.settings.mm.batch_size, 1) * 4
            for s in range(0, len(todo), bs):
                part = todo[s : s + bs]
                vecs, kept, errors = self.embed_images([p for p, _ in part])
                rep.errors.extend(str(e) for e in errors)
                caps = [captions.get(part[i][0], "") for i in kept]
                cap_idx = [j for j, c in enumerate(caps) if c]
                uniq = list(dict.fromkeys(caps[j] for j in cap_idx))  # shared names: once
                uvecs = self.embed_texts(uniq) if uniq else None
                row = {c: r for r, c in enumerate(uniq)}
                cap_vecs = uvecs[[row[caps[j]] for j in cap_idx]] if uvecs is not None else None
                records: list[ChunkRecord] = []
                now = int(time.time())
                for j, i in enumerate(kept):
                    p, h = part[i]
                    records.append(self._record(p, h, caps[j], "image", vecs[j], now))
                if cap_vecs is not None:
                    for r, j in enumerate(cap_idx):
                        p, h = part[kept[j]]
                        records.append(self._record(p, h, caps[j], "text", cap_vecs[r], now))
                store.replace_sources(records, {part[i][0].as_posix(): part[i][1] for i in kept})
                rep.images_indexed += len(kept)
                rep.captions_indexed += len(cap_idx)
                if progress:
                    progress(len(part), len(todo))
            if rep.images_indexed:
                store.finalize()
        rep.seconds = round(time.time() - t0, 2)
        return rep

    @staticmethod
    def _record(
        p: Path, h: str, caption: str, modality: str, vec: np.ndarray, now: int
    ) -> ChunkRecord:
        return ChunkRecord(
            id=hashlib.sha256(f"{p.as_posix()}\x00{modality}\x00{h}".encode()).hexdigest()[:32],
            source=p.as_posix(),
            doc_id=p.stem,
            title=caption or p.name,
            text=caption,
            chunk_index=0 if modality == "image" else 1,
            start=0,
            end=len(caption),
            page=0,
            source_hash=h,
            ingested_at=now,
            vector=vec,
            modality=modality,
        )

    # -- search -------------------------------------------------------------------------
    def search_vector(self, vec: np.ndarray, k: int, modality: Modality) -> list[Hit]:
        """Nearest rows of one modality. Caption hits are distinct texts: many images
        share a caption, and k copies of one name would hide the other candidates."""
        if modality not in ("image", "text"):
            raise ValueError(f"modality {modality!r}: choose image or text")
        where = f"modality = {sql_str(modality)}"
        depth = k if modality == "image" else k * 5
        while True:
            hits = self.store.dense_search(vec, depth, where=where)
            if modality == "text":
                seen: dict[str, Hit] = {}
                for h in hits:
                    seen.setdefault(h.text.lower(), h)
                distinct = list(seen.values())
                if len(distinct) < k and len(hits) == depth:
                    depth *= 4
                    continue
                hits = distinct[:k]
            break
        for h in hits:
            h.scores = {"cosine": h.score}
        return hits

    def search_text(self, query: str, k: int = 5, modality: Modality = "image") -> list[Hit]:
        """text -> image (default) or text -> caption."""
        if not query.strip():
            raise ValueError("query is empty")
        return self.search_vector(self.embed_texts([query])[0], k, modality)

    def search_image(self, path: Path, k: int = 5, modality: Modality = "image") -> list[Hit]:
        """image -> image (default) or image -> caption; raises ImageLoadError for a bad file."""
        vecs, _, errors = self.embed_images([Path(path)])
        if errors:
            raise errors[0]
        return self.search_vector(vecs[0], k, modality)
