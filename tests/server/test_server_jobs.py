"""The job manager on its own: persistence, failure and resume, restart recovery."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aiprime.rag.ingest import IngestReport
from aiprime.server.jobs import JobManager


def _stage(m: JobManager, job_id: str, names: list[str]) -> None:
    d = m.staging(job_id)
    d.mkdir(parents=True)
    for n in names:
        (d / n).write_text(f"# {n}\n\ntext\n")


def test_failed_job_is_resumed_and_progress_is_persisted(tmp_path: Path) -> None:
    calls: list[list[str]] = []

    def ingest(collection: str, paths: list[Path]) -> IngestReport:
        calls.append([p.name for p in paths])
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return IngestReport(files_ingested=len(paths), chunks_written=len(paths))

    m = JobManager(tmp_path / "jobs", tmp_path / "uploads", ingest, group_files=2)
    m.start()
    try:
        job_id = m.new_id()
        _stage(m, job_id, ["a.md", "b.md", "c.md"])
        m.submit(job_id, "default", ["a.md", "b.md", "c.md"])
        job = m.wait(job_id, timeout=30)
        assert job is not None and job.status == "failed" and "disk full" in (job.error or "")
        assert job.files_done == 2  # the first group was committed and recorded
        on_disk = json.loads((tmp_path / "jobs" / f"{job_id}.json").read_text())
        assert on_disk["status"] == "failed" and on_disk["files_done"] == 2
        assert sorted(p.name for p in (tmp_path / "uploads" / "default").iterdir()) == [
            "a.md",
            "b.md",
            "c.md",
        ]
        m.resume(job_id)
        job = m.wait(job_id, timeout=30)
        assert job is not None and job.status == "done" and job.attempts == 2
        assert job.files_done == 3 and job.error is None
        assert not m.staging(job_id).exists()
        with pytest.raises(ValueError, match="only a failed job"):
            m.resume(job_id)
    finally:
        m.stop()


def test_restart_requeues_interrupted_jobs_and_drops_orphan_uploads(tmp_path: Path) -> None:
    done: list[str] = []

    def ingest(collection: str, paths: list[Path]) -> IngestReport:
        done.extend(p.name for p in paths)
        return IngestReport(files_ingested=len(paths))

    first = JobManager(tmp_path / "jobs", tmp_path / "uploads", ingest)
    job_id = first.new_id()
    _stage(first, job_id, ["x.md"])
    first.submit(job_id, "c1", ["x.md"])  # never started: the "server" died
    orphan = first.staging(first.new_id())
    orphan.mkdir()  # an upload whose job was never recorded
    (tmp_path / "jobs" / "junk.json").write_text("{not json")

    second = JobManager(tmp_path / "jobs", tmp_path / "uploads", ingest)
    assert second.load() == [job_id]
    assert not orphan.exists()
    second.start()
    try:
        job = second.wait(job_id, timeout=30)
        assert job is not None and job.status == "done" and done == ["x.md"]
        assert (tmp_path / "uploads" / "c1" / "x.md").is_file()
    finally:
        second.stop()
