"""API keys (hashed at rest), safe file names and upload content checks.

Keys look like ``aip_<id>_<secret>``. Only the id, a random salt and the scrypt hash of
the whole key are stored, so a leaked key file does not leak keys; the id selects the one
record to check, so a wrong key costs one scrypt and an unknown id costs none.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import ipaddress
import json
import os
import re
import secrets
import threading
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}
_KEY = re.compile(r"^aip_([0-9a-f]{12})_([A-Za-z0-9_\-]{20,128})$")


class SecurityError(Exception):
    """A configuration the service must not start with."""


def _hash(key: str, salt: bytes) -> bytes:
    return hashlib.scrypt(key.encode(), salt=salt, **_SCRYPT)


@dataclass(frozen=True)
class KeyInfo:
    id: str
    name: str
    created_at: float


class ApiKeys:
    """The key file: create, revoke, list and verify keys; re-read when it changes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._mtime: float | None = None
        self._records: dict[str, dict[str, Any]] = {}
        # sha256(key) -> key id of keys verified since the file last changed, so a client
        # does not pay one scrypt per request. In memory only.
        self._verified: dict[bytes, str] = {}

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            self._records, self._mtime, self._verified = {}, None, {}
            return self._records
        if mtime != self._mtime:
            data = json.loads(self.path.read_text())
            keys = data.get("keys", {}) if isinstance(data, dict) else {}
            if not isinstance(keys, dict):
                raise SecurityError(f"{self.path}: 'keys' must be an object")
            self._records, self._mtime, self._verified = keys, mtime, {}
        return self._records

    def _save(self, records: dict[str, dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"version": 1, "keys": records}, fh, indent=2)
        os.replace(tmp, self.path)

    def create(self, name: str) -> str:
        """Add a key and return it; it is shown once and never stored in clear."""
        with self._lock:
            records = dict(self._load())
            key_id = secrets.token_hex(6)
            key = f"aip_{key_id}_{secrets.token_urlsafe(32)}"
            salt = secrets.token_bytes(16)
            records[key_id] = {
                "name": name,
                "salt": salt.hex(),
                "hash": _hash(key, salt).hex(),
                "created_at": time.time(),
            }
            self._save(records)
            self._mtime = None
            return key

    def revoke(self, key_id: str) -> bool:
        with self._lock:
            records = dict(self._load())
            if records.pop(key_id, None) is None:
                return False
            self._save(records)
            self._mtime = None
            return True

    def list(self) -> list[KeyInfo]:
        with self._lock:
            return [
                KeyInfo(k, str(r.get("name", "")), float(r.get("created_at", 0)))
                for k, r in sorted(self._load().items())
            ]

    def __len__(self) -> int:
        with self._lock:
            return len(self._load())

    def verify(self, key: str | None) -> str | None:
        """The key's id when it is valid, else None (constant time in the secret)."""
        if not key:
            return None
        m = _KEY.match(key)
        if not m:
            return None
        digest = hashlib.sha256(key.encode()).digest()
        with self._lock:
            records = self._load()
            cached = self._verified.get(digest)
            if cached is not None and cached in records:
                return cached
            rec = records.get(m.group(1))
        if rec is None:
            return None
        try:
            ok = hmac.compare_digest(_hash(key, bytes.fromhex(rec["salt"])).hex(), rec["hash"])
        except (KeyError, ValueError, TypeError):
            return None
        if not ok:
            return None
        with self._lock:
            self._verified[digest] = m.group(1)
        return m.group(1)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'; anything else may be reachable."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# -- file names ---------------------------------------------------------------------------

_UNSAFE = re.compile(r"[^A-Za-z0-9._\- ]+")


def safe_filename(name: str, max_len: int = 120) -> str:
    """A client's file name reduced to one harmless path component.

    Only the last component of either separator survives, every character outside
    ``[A-Za-z0-9._- ]`` becomes '_', and leading dots go, so '..', absolute paths,
    drive letters, NULs and hidden files are impossible. Raises ValueError when nothing
    usable is left.
    """
    base = unicodedata.normalize("NFKC", name).replace("\\", "/").split("/")[-1]
    base = _UNSAFE.sub("_", base).strip(" ._")
    if len(base) > max_len:
        stem, dot, suffix = base.rpartition(".")
        base = (stem[: max_len - len(suffix) - 1] + dot + suffix) if dot else base[:max_len]
    if not base or "." not in base:
        raise ValueError(f"file name {name!r} has no usable name and extension")
    return base


def inside(root: Path, name: str) -> Path:
    """``root / name``, refusing anything that would resolve outside ``root``."""
    root = root.resolve()
    p = (root / name).resolve()
    if p.parent != root:
        raise ValueError(f"file name {name!r} escapes its folder")
    return p


# -- content checks -----------------------------------------------------------------------

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".html", ".htm", ".jsonl"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"}
PDF_SUFFIXES = {".pdf"}
_IMAGE_MAGIC = {
    "png": (b"\x89PNG\r\n\x1a\n",),
    "jpeg": (b"\xff\xd8\xff",),
    "gif": (b"GIF87a", b"GIF89a"),
    "bmp": (b"BM",),
}


class ContentError(Exception):
    """An upload whose bytes do not match what it claims to be; ``status`` is the HTTP code."""

    def __init__(self, message: str, status: int = 415) -> None:
        super().__init__(message)
        self.status = status


def sniff_image(data: bytes) -> str | None:
    for kind, magics in _IMAGE_MAGIC.items():
        if any(data.startswith(m) for m in magics):
            return kind
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def kind_of(name: str) -> str:
    """'text', 'pdf' or 'image' from the (already safe) file name; ValueError otherwise."""
    suffix = Path(name).suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return "text"
    if suffix in PDF_SUFFIXES:
        return "pdf"
    if suffix in IMAGE_SUFFIXES:
        return "image"
    allowed = sorted(TEXT_SUFFIXES | PDF_SUFFIXES | IMAGE_SUFFIXES)
    raise ValueError(f"unsupported file type {suffix or '(none)'!r}; allowed: {allowed}")


_DECLARED_OK = {
    "text": ("text/", "application/json", "application/x-ndjson", "application/jsonl"),
    "pdf": ("application/pdf", "application/x-pdf"),
    "image": ("image/",),
}


def check_content(name: str, data: bytes, declared: str | None, max_pixels: int) -> str:
    """Check that the bytes are what the name and the declared content type say; returns
    the kind. Text must be UTF-8 without NULs, a PDF must start with ``%PDF-``, an image
    must carry a known signature and decode to at most ``max_pixels`` pixels."""
    kind = kind_of(name)
    ctype = (declared or "").split(";")[0].strip().lower()
    if ctype and ctype != "application/octet-stream" and not ctype.startswith(_DECLARED_OK[kind]):
        raise ContentError(f"{name}: declared content type {ctype!r} does not fit a {kind} file")
    if not data:
        raise ContentError(f"{name}: empty file", 400)
    if kind == "text":
        if b"\x00" in data:
            raise ContentError(f"{name}: binary data (NUL bytes) in a text file")
        try:
            data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise ContentError(f"{name}: not valid UTF-8 (offset {e.start})") from e
    elif kind == "pdf":
        if not data.startswith(b"%PDF-"):
            raise ContentError(f"{name}: not a PDF (no %PDF- signature)")
    else:
        if sniff_image(data) is None:
            raise ContentError(f"{name}: not a PNG, JPEG, GIF, BMP or WebP image")
        check_image(name, data, max_pixels)
    return kind


def check_image(name: str, data: bytes, max_pixels: int) -> tuple[int, int]:
    """Decode the header only and refuse oversize images before any pixel is decoded
    (a few KB of PNG can expand to gigabytes); then verify the file's structure."""
    import warnings

    try:
        from PIL import Image
    except ImportError as e:  # Pillow comes with the `mm` extra
        raise ContentError(f"{name}: images need Pillow (pip install 'aiprime[mm]')", 501) from e
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ContentError(
                        f"{name}: image is {w}x{h} = {w * h} pixels, more than the "
                        f"{max_pixels} allowed",
                        413,
                    )
                im.verify()
    except ContentError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ContentError(f"{name}: image too large ({e})", 413) from e
    except Exception as e:  # PIL raises many types for corrupt files
        raise ContentError(f"{name}: not a readable image ({type(e).__name__})") from e
    return w, h
