"""Search load on the HTTP service: requests/s and p50/p95 latency at 1, 8 and 32 clients.

Starts `aiprime serve` (real embedder: all-MiniLM-L6-v2, ONNX int8, hybrid retrieval, no
re-ranker) in its own process on a loopback port over a fresh data directory, uploads the
project's documentation through POST /v1/ingest, then runs each concurrency level for a
fixed time with one keep-alive HTTP connection per client thread. The client runs on the
same machine as the server, so both share its cores.

    python benchmarks/serve_load.py --seconds 20 --out out/serve_load.json
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx
from _common import write_results

ROOT = Path(__file__).resolve().parents[1]
QUERIES = [
    "how does ingestion survive a crash in the middle of a batch?",
    "which embedding model runs offline",
    "reciprocal rank fusion versus normalized score mix",
    "what nDCG@10 does hybrid retrieval reach on SciFact?",
    "expert parallelism all-to-all",
    "load balancing loss for mixture of experts",
    "chunk size in model tokens",
    "BM25 stemming and stop words",
    "cross-encoder re-ranking",
    "LanceDB consistency MVCC readers",
    "capacity factor token dropping",
    "int8 quantised ONNX export",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("server not ready in time")


def run_level(url: str, clients: int, seconds: float, mode: str) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    started = [0.0]

    def begin() -> None:  # runs once, before any client passes the barrier
        started[0] = time.perf_counter()

    start = threading.Barrier(clients + 1, action=begin)

    def worker(i: int) -> None:
        nonlocal errors
        mine: list[float] = []
        bad = 0
        with httpx.Client(base_url=url, timeout=60) as c:
            c.post("/v1/search", json={"query": QUERIES[i % len(QUERIES)], "mode": mode})
            start.wait()
            n = i
            while time.perf_counter() < started[0] + seconds:
                q = QUERIES[n % len(QUERIES)]
                n += 1
                t0 = time.perf_counter()
                r = c.post("/v1/search", json={"query": q, "k": 10, "mode": mode})
                dt = time.perf_counter() - t0
                if r.status_code == 200:
                    mine.append(dt)
                else:
                    bad += 1
        with lock:
            latencies.extend(mine)
            errors += bad

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started[0]
    q = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else [float("nan")] * 99
    return {
        "requests": len(latencies),
        "errors": errors,
        "rps": round(len(latencies) / wall, 1),
        "p50_ms": round(q[49] * 1000, 1),
        "p95_ms": round(q[94] * 1000, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--seconds", type=float, default=20.0, help="per concurrency level")
    ap.add_argument("--mode", default="hybrid", choices=["bm25", "dense", "hybrid"])
    ap.add_argument("--home", type=Path, default=None, help="data directory (default: temp)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    home = args.home or Path(tempfile.mkdtemp(prefix="serve-load-"))
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "AIPRIME_HOME": str(home)}
    cmd = [
        sys.executable,
        "-m",
        "aiprime.cli",
        "serve",
        "--allow-no-auth",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, env=env)
    try:
        _wait_ready(url, proc)
        files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
        with httpx.Client(base_url=url, timeout=600) as c:
            upload = [("files", (p.name, p.read_bytes(), "text/markdown")) for p in files]
            job = c.post("/v1/ingest", params={"wait": "true"}, files=upload).json()
            if job["status"] != "done":
                raise SystemExit(f"ingest failed: {job}")
            chunks = c.get("/v1/collections").json()["collections"][0]["chunks"]
        out: dict[str, object] = {
            "mode": args.mode,
            "seconds_per_level": args.seconds,
            "files": len(files),
            "chunks": chunks,
            "cpus": os.cpu_count(),
            "load_avg_1m_before": round(os.getloadavg()[0], 1),
        }
        for n in args.levels:
            res = run_level(url, n, args.seconds, args.mode)
            for k, v in res.items():
                out[f"c{n}_{k}"] = v
            print(f"clients={n:3d} {res} load={os.getloadavg()[0]:.1f}", flush=True)
        write_results(out, args.out)
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
