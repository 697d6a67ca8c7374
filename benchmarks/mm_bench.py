"""Multimodal throughput and latency: images/s embedded (decode + resize + image tower,
and the image tower alone on decoded pixels) and search latency (text->image,
image->image) on a LanceDB collection of the indexed images.

    python benchmarks/mm_bench.py --model out/mm/fashion/model \
        --images ../shared/data/fashion --n 2000 --out out/mm_bench.json

Without --model it draws synthetic shapes and trains a tiny model first (a smoke run).
Medians over repetitions; one torch thread unless --threads says otherwise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("LANCE_LOG", "error")

import torch
from _common import write_results

from aiprime.config import load_settings
from aiprime.multimodal.augment import to_float
from aiprime.multimodal.images import find_images, load_batch
from aiprime.multimodal.search import MultimodalIndex

QUERIES = [
    "navy blue shirt for men",
    "black handbag",
    "white sports shoes",
    "red dress for women",
    "a large red circle",
    "small blue star on a black background",
    "grey watch",
    "brown leather belt",
]


def _tiny_model(work: Path) -> tuple[Path, Path]:
    from aiprime.multimodal.synthetic import make_dataset
    from aiprime.multimodal.train import TrainConfig, train

    data = make_dataset(work / "shapes", n=600, seed=0)
    cfg = TrainConfig.from_toml(
        Path(__file__).resolve().parents[1] / "configs" / "mm" / "synthetic.toml",
        **{"optim.steps": 30},
    )
    train(cfg, data, work / "run", work / "cache")
    return work / "run" / "model", data


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--images", type=Path, default=None)
    ap.add_argument("--n", type=int, default=1000, help="Images to index.")
    ap.add_argument("--queries", type=int, default=40, help="Searches per direction.")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("out/mm_bench.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="mm-bench-"))
    model_dir, images = args.model, args.images
    if model_dir is None:
        model_dir, images = _tiny_model(work)
    assert images is not None, "--images is required with --model"
    paths = find_images(images)[: args.n]
    settings = load_settings(work / "home")
    idx = MultimodalIndex(settings, model_dir)
    m = idx.model

    # 1) decode + resize + embed, end to end, in index-sized batches
    t0 = time.perf_counter()
    _, kept, errors = idx.embed_images(paths)
    t_full = time.perf_counter() - t0
    # 2) the image tower alone on decoded pixels (what training/eval caches make possible)
    px = torch.from_numpy(load_batch(paths[:256], m.image_size).pixels)
    reps = []
    with torch.no_grad():
        for _ in range(5):
            t = time.perf_counter()
            m.encode_image(to_float(px))
            reps.append(time.perf_counter() - t)
    tower = len(px) / statistics.median(reps)

    # 3) index, then search latency in both directions
    t0 = time.perf_counter()
    rep = idx.index(images if len(paths) == len(find_images(images)) else _subset(paths, work))
    t_index = time.perf_counter() - t0
    qs = [QUERIES[i % len(QUERIES)] for i in range(args.queries)]
    idx.search_text(qs[0], 10)  # warm-up
    lat_t = []
    for q in qs:
        t = time.perf_counter()
        idx.search_text(q, 10)
        lat_t.append((time.perf_counter() - t) * 1000)
    lat_i = []
    for p in paths[: args.queries]:
        t = time.perf_counter()
        idx.search_image(p, 10)
        lat_i.append((time.perf_counter() - t) * 1000)
    out = {
        "model": str(model_dir),
        "image_size": m.image_size,
        "threads": args.threads,
        "images": len(paths),
        "skipped": len(errors),
        "embed_images_per_s_end_to_end": round(len(kept) / t_full, 1),
        "image_tower_images_per_s": round(tower, 1),
        "index_seconds": round(t_index, 2),
        "indexed_rows": idx.store.count(),
        "text_to_image_ms_p50": round(statistics.median(lat_t), 2),
        "text_to_image_ms_p95": round(sorted(lat_t)[int(0.95 * (len(lat_t) - 1))], 2),
        "image_to_image_ms_p50": round(statistics.median(lat_i), 2),
        "image_to_image_ms_p95": round(sorted(lat_i)[int(0.95 * (len(lat_i) - 1))], 2),
        "index_report": rep.to_dict(),
    }
    write_results(out, args.out)


def _subset(paths: list[Path], work: Path) -> Path:
    """Symlink a subset of images into one folder, so only those are indexed."""
    d = work / "subset"
    d.mkdir(exist_ok=True)
    for p in paths:
        (d / p.name).symlink_to(p.resolve())
    return d


if __name__ == "__main__":
    main()
