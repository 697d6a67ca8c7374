"""Background ingest jobs whose state survives a crash.

A job is a JSON file under ``home/serve/jobs`` (written atomically) plus a folder of staged
uploads. The worker moves staged files into the collection's upload folder and ingests them
in groups; each group is one incremental ingest, so after a SIGKILL the job is re-queued at
start-up and the files already committed are skipped by their SHA-256: no duplicates.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from aiprime.rag.ingest import IngestReport

log = logging.getLogger("aiprime.server")

Status = Literal["queued", "running", "done", "failed"]
IngestFn = Callable[[str, list[Path]], IngestReport]


@dataclass
class Job:
    id: str
    collection: str
    files: list[str]
    status: Status = "queued"
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    files_done: int = 0
    files_ingested: int = 0
    files_unchanged: int = 0
    chunks_written: int = 0
    errors: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def files_total(self) -> int:
        return len(self.files)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["files_total"] = self.files_total
        d["progress"] = round(self.files_done / self.files_total, 4) if self.files else 1.0
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Job:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})


class JobManager:
    """One worker thread runs jobs in arrival order; state is persisted at each step."""

    def __init__(
        self,
        root: Path,
        uploads: Path,
        ingest: IngestFn,
        group_files: int = 16,
        on_change: Callable[[Job], None] | None = None,
    ) -> None:
        self.root = Path(root)
        self.uploads = Path(uploads)
        self.root.mkdir(parents=True, exist_ok=True)
        self._ingest = ingest
        self.group_files = group_files
        self._on_change = on_change
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition(self._lock)

    # -- persistence ------------------------------------------------------------------
    def _path(self, job_id: str) -> Path:
        return self.root / f"{job_id}.json"

    def staging(self, job_id: str) -> Path:
        return self.root / job_id

    def _save(self, job: Job) -> None:
        tmp = self._path(job.id).with_suffix(".tmp")
        tmp.write_text(json.dumps(job.to_dict()))
        os.replace(tmp, self._path(job.id))
        if self._on_change:
            self._on_change(job)

    def load(self, resume: bool = True) -> list[str]:
        """Read the persisted jobs; re-queue interrupted ones (``resume``); drop staging
        folders of uploads that never became a job. Returns the re-queued ids."""
        resumed: list[tuple[float, str]] = []
        for p in sorted(self.root.glob("*.json")):
            try:
                job = Job.from_dict(json.loads(p.read_text()))
            except (ValueError, TypeError) as e:
                log.warning("skipping unreadable job file %s: %s", p, e)
                continue
            self._jobs[job.id] = job
            if job.status in ("queued", "running") and resume:
                job.status = "queued"
                resumed.append((job.created_at, job.id))
        for d in self.root.iterdir():
            if d.is_dir() and d.name not in self._jobs:
                shutil.rmtree(d, ignore_errors=True)
        for _, job_id in sorted(resumed):
            self._queue.put(job_id)
        return [j for _, j in sorted(resumed)]

    # -- API --------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="aiprime-ingest", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def new_id(self) -> str:
        return uuid.uuid4().hex

    def submit(self, job_id: str, collection: str, files: list[str]) -> Job:
        """Queue a job whose files are already staged under ``staging(job_id)``."""
        job = Job(job_id, collection, files)
        with self._lock:
            self._jobs[job.id] = job
            self._save(job)
        self._queue.put(job.id)
        return job

    def resume(self, job_id: str) -> Job:
        """Re-queue a failed job (ValueError if it is not failed)."""
        with self._lock:
            job = self._jobs[job_id]
            if job.status != "failed":
                raise ValueError(f"job {job_id} is {job.status}; only a failed job is resumed")
            job.status, job.error = "queued", None
            self._save(job)
        self._queue.put(job_id)
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            job = self._jobs.get(job_id)
            return Job.from_dict(job.to_dict()) if job else None

    def list(self, limit: int = 100) -> list[Job]:
        with self._lock:
            jobs = sorted(self._jobs.values(), key=lambda j: -j.created_at)[:limit]
            return [Job.from_dict(j.to_dict()) for j in jobs]

    def active(self, collection: str | None = None) -> int:
        with self._lock:
            return sum(
                j.status in ("queued", "running")
                and (collection is None or j.collection == collection)
                for j in self._jobs.values()
            )

    def counts(self) -> dict[str, int]:
        out = {"queued": 0, "running": 0, "done": 0, "failed": 0}
        with self._lock:
            for j in self._jobs.values():
                out[j.status] += 1
        return out

    def wait(self, job_id: str, timeout: float) -> Job | None:
        """Block until the job is done or failed (or ``timeout`` passes)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                job = self._jobs.get(job_id)
                if job is None or job.status in ("done", "failed"):
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
        return self.get(job_id)

    # -- worker -----------------------------------------------------------------------
    def _update(self, job: Job, **changes: Any) -> None:
        with self._cond:
            for k, v in changes.items():
                setattr(job, k, v)
            self._save(job)
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            job_id = self._queue.get()
            if job_id is None:
                return
            job = self._jobs.get(job_id)
            if job is None or job.status != "queued":
                continue
            try:
                self._process(job)
            except Exception as e:  # a job never kills the worker
                log.exception("ingest job %s failed", job.id)
                self._update(
                    job, status="failed", error=f"{type(e).__name__}: {e}", finished_at=time.time()
                )

    def _process(self, job: Job) -> None:
        self._update(
            job,
            status="running",
            started_at=time.time(),
            attempts=job.attempts + 1,
            files_done=0,
            files_ingested=0,
            files_unchanged=0,
            chunks_written=0,
            errors=[],
        )
        dest = self.uploads / job.collection
        dest.mkdir(parents=True, exist_ok=True)
        staged = self.staging(job.id)
        paths: list[Path] = []
        for name in job.files:
            src, dst = staged / name, dest / name
            if src.exists():  # a resumed job may have moved it already
                os.replace(src, dst)
            if dst.exists():
                paths.append(dst)
            else:
                job.errors.append(f"{name}: upload lost before it was stored")
        missing = len(job.files) - len(paths)
        self._update(job, files_done=missing)
        for i in range(0, len(paths), self.group_files):
            group = paths[i : i + self.group_files]
            report = self._ingest(job.collection, group)
            self._update(
                job,
                files_done=job.files_done + len(group),
                files_ingested=job.files_ingested + report.files_ingested,
                files_unchanged=job.files_unchanged + report.files_unchanged,
                chunks_written=job.chunks_written + report.chunks_written,
                errors=job.errors + [_relative(str(e), dest) for e in report.errors],
            )
        shutil.rmtree(staged, ignore_errors=True)
        self._update(job, status="done", finished_at=time.time())


def _relative(message: str, folder: Path) -> str:
    """Error lines name the uploaded file, not the server's folder layout."""
    return message.replace(str(folder.resolve()) + os.sep, "").replace(str(folder) + os.sep, "")
