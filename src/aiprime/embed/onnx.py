"""Fast CPU backend: the sentence-transformers model exported to ONNX Runtime.

The graph includes pooling and L2 normalisation, so one ``run`` gives final embeddings.
Optional int8 dynamic quantisation (per-channel weights) roughly doubles CPU throughput
on VNNI hardware; its retrieval cost is measured in docs/results.md. Texts run in batches
of one token length, so no position is padding and the graph has no attention mask.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

# No attention mask: every batch holds texts of one token length (``length_batches``), so
# nothing is ever padded, and the graph skips the mask arithmetic of every attention
# layer (8% faster on MiniLM int8, measured; docs/results.md).
_INPUTS = ("input_ids", "token_type_ids")
# Part of the export's file name: bump when the exported graph changes.
_EXPORT_VERSION = "v3-nomask"


_SUPPORTED_MODULES = ("Transformer", "Pooling", "Normalize")


def _check_modules(model_dir: Path) -> None:
    """The export covers transformer + pooling + normalisation; refuse anything more
    (a Dense head, say) rather than silently give different embeddings than torch."""
    modules = model_dir / "modules.json"
    if not modules.is_file():
        return
    extra = [
        m.get("type", "?")
        for m in json.loads(modules.read_text())
        if not str(m.get("type", "")).endswith(_SUPPORTED_MODULES)
    ]
    if extra:
        raise ValueError(
            f"{model_dir}: modules {extra} are not supported by the ONNX backend "
            "(use backend 'torch')"
        )


def _pooling_mode(model_dir: Path) -> str:
    """Read the sentence-transformers pooling config; mean pooling when none is given."""
    for cfg in sorted(model_dir.glob("*Pooling*/config.json")):
        conf = json.loads(cfg.read_text())
        # sentence-transformers >= 6 writes "pooling_mode": "mean" (or a list); older
        # versions one boolean flag per mode.
        mode = conf.get("pooling_mode")
        if mode is not None:
            modes = {mode} if isinstance(mode, str) else set(mode)
        else:
            modes = {
                name
                for flag, name in (
                    ("pooling_mode_cls_token", "cls"),
                    ("pooling_mode_mean_tokens", "mean"),
                    ("pooling_mode_max_tokens", "max"),
                    ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len_tokens"),
                    ("pooling_mode_weightedmean_tokens", "weightedmean"),
                    ("pooling_mode_lasttoken", "lasttoken"),
                )
                if conf.get(flag)
            }
        if modes in ({"cls"}, {"mean"}):
            return modes.pop()
        raise ValueError(
            f"{cfg}: pooling {sorted(modes)}; only mean or CLS pooling is supported by the "
            "ONNX backend (use backend 'torch')"
        )
    return "mean"


def _fingerprint(model_dir: Path, quantize: bool, max_len: int, version: str = "v2") -> str:
    h = hashlib.sha256(f"{version}|{quantize}|{max_len}".encode())
    for f in sorted(model_dir.iterdir()):
        if f.is_file() and f.suffix in {".json", ".safetensors", ".bin", ".txt"}:
            st = f.stat()
            h.update(f"{f.name}|{st.st_size}|{int(st.st_mtime)}".encode())
    return f"{model_dir.name}-{h.hexdigest()[:12]}"


def export_onnx(model_dir: Path, out_path: Path, quantize: bool) -> Path:
    """Export model + pooling + normalisation to ONNX, optionally quantise to int8.

    The graph takes no attention mask: callers feed batches of equal-length texts.
    """
    import torch
    from transformers import AutoModel, AutoTokenizer

    _check_modules(model_dir)
    pooling = _pooling_mode(model_dir)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    # Eager attention exports as plain MatMul/Softmax, which int8 quantisation and ORT's
    # CPU kernels handle better than the SDPA export (1.5x faster measured on MiniLM).
    try:
        model = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager").eval()
    except (TypeError, ValueError):
        model = AutoModel.from_pretrained(str(model_dir)).eval()

    # Models without segment embeddings (DistilBERT, say) take no token_type_ids.
    inputs = [k for k in _INPUTS if k in inspect.signature(model.forward).parameters]

    class _Wrapped(torch.nn.Module):
        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            h = self.m(**dict(zip(inputs, tensors, strict=True))).last_hidden_state
            e = h[:, 0] if pooling == "cls" else h.mean(1)
            return torch.nn.functional.normalize(e, dim=-1)

    sample = tok(["export sample", "export sample"], return_tensors="pt")
    if "token_type_ids" not in sample:
        sample["token_type_ids"] = torch.zeros_like(sample["input_ids"])
    dyn: dict[str, Any] = {k: {0: "batch", 1: "seq"} for k in inputs}
    dyn["embedding"] = {0: "batch"}
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer chatter about constant shapes
            torch.onnx.export(
                _Wrapped(model),
                tuple(sample[k] for k in inputs),
                str(raw),
                input_names=inputs,
                output_names=["embedding"],
                dynamic_axes=dyn,
                opset_version=17,
                dynamo=False,
            )
        publish(raw, out_path, quantize)
    return out_path


def publish(raw: Path, out_path: Path, quantize: bool) -> None:
    """Optionally quantise an exported graph (int8 weights, per channel: ~2x on VNNI CPUs),
    then publish it atomically, so a crash mid-export never leaves half a model behind."""
    final = raw
    if quantize:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        final = raw.with_name("int8.onnx")
        logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))
        quantize_dynamic(str(raw), str(final), weight_type=QuantType.QInt8, per_channel=True)
    partial = out_path.with_suffix(".partial")
    shutil.copyfile(final, partial)
    os.replace(partial, out_path)


# ORT's fused SkipLayerNormalization CPU kernel is several times slower per element than
# the Add + LayerNormalization it replaces: without the fusion MiniLM int8 runs 14-16%
# faster on one thread, fp32 ~2% (same model, same math; docs/results.md).
_DISABLED_FUSIONS = ["SkipLayerNormFusion"]


def cpu_session(path: Path, threads: int = 0) -> Any:
    """An ONNX Runtime CPU session with full graph optimisation; 0 threads = all cores."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or (os.cpu_count() or 1)
    so.inter_op_num_threads = 1
    return ort.InferenceSession(
        str(path), so, providers=["CPUExecutionProvider"], disabled_optimizers=_DISABLED_FUSIONS
    )


def length_batches(
    lengths: Sequence[int], max_batch: int, max_tokens: int | None = None
) -> list[list[int]]:
    """Indices grouped into batches of texts of one token length: at most ``max_batch``
    texts and, when given, at most ``max_tokens`` tokens (but always at least one text).

    Why: on CPU a padded position costs as much as a real one, and more in attention.
    Sorting by characters (what sentence-transformers does) left 32% of the positions of
    SciFact chunk batches as padding; equal-length batches leave none and need no
    attention mask. The token cap keeps a batch's activations in the core's cache.
    """
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(n, []).append(i)
    out: list[list[int]] = []
    for n, g in sorted(groups.items()):
        size = max_batch if max_tokens is None else max(1, min(max_batch, max_tokens // max(n, 1)))
        out.extend(g[k : k + size] for k in range(0, len(g), size))
    return out


class SessionPool:
    """One single-threaded ONNX Runtime session, run by one worker thread per core.

    Parallelism across batches rather than inside each operator: every core runs whole
    small batches out of its own cache and no operator waits on another thread. On 2 cores
    that is 1.2x faster than one 2-thread session on batches of 64 (docs/results.md).
    """

    def __init__(self, path: Path, threads: int = 0) -> None:
        self.session = cpu_session(path, 1)
        self.workers = threads or os.cpu_count() or 1
        self.inputs = {i.name for i in self.session.get_inputs()}
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0

    def _executor(self) -> ThreadPoolExecutor | None:
        """The worker pool, made on first use and made anew in a forked child: a parent's
        threads do not survive ``fork``, and a pool that counts them as idle would hang."""
        if self.workers == 1:
            return None
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = ThreadPoolExecutor(self.workers, "aiprime-onnx")
            self._pool_pid = os.getpid()
        return self._pool

    def feed(
        self, ids: list[list[int]], types: list[list[int]] | None = None
    ) -> dict[str, np.ndarray]:
        """The inputs for a batch of equal-length token lists. Nothing is padded, so a graph
        that takes a mask (older exports, the cross-encoder) gets all ones."""
        input_ids = np.asarray(ids, dtype=np.int64)
        feeds = {"input_ids": input_ids}
        if "token_type_ids" in self.inputs:
            feeds["token_type_ids"] = (
                np.zeros_like(input_ids) if types is None else np.asarray(types, dtype=np.int64)
            )
        if "attention_mask" in self.inputs:
            feeds["attention_mask"] = np.ones_like(input_ids)
        return feeds

    def run(self, feeds: Sequence[dict[str, np.ndarray]]) -> list[np.ndarray]:
        """The first output of each feed, in order; the workers take feeds as they come free."""

        def one(feed: dict[str, np.ndarray]) -> np.ndarray:
            return np.asarray(self.session.run(None, feed)[0], dtype=np.float32)

        pool = self._executor() if len(feeds) > 1 else None
        return list(map(one, feeds) if pool is None else pool.map(one, feeds))

    def run_unpadded(
        self,
        ids: list[list[int]],
        types: list[list[int]] | None,
        max_batch: int,
        max_tokens: int | None,
    ) -> np.ndarray:
        """The first output for each token list, in input order, computed in batches of one
        token length (``length_batches``), so nothing is padded."""
        if not ids:
            return np.zeros(0, dtype=np.float32)
        batches = length_batches([len(x) for x in ids], max_batch, max_tokens)
        feeds = [
            self.feed([ids[i] for i in b], None if types is None else [types[i] for i in b])
            for b in batches
        ]
        got = np.concatenate(self.run(feeds))
        out = np.empty_like(got)
        out[np.fromiter((i for b in batches for i in b), np.int64, len(ids))] = got
        return out


class OnnxEmbedder:
    """sentence-transformers-compatible ``encode`` on ONNX Runtime.

    Texts are tokenised once per call by the Rust tokenizer (no per-batch Python
    conversion) and run in small batches of equal token length, so nothing is padded.
    The batches are spread over ``threads`` workers that share one single-threaded
    session: each core runs whole batches out of its own cache, with no synchronisation
    inside an operator. On 2 cores this is 1.2x faster than one 2-thread session on
    batches of 64 (docs/results.md).
    """

    def __init__(
        self,
        onnx_path: Path,
        tokenizer_dir: Path,
        model_id: str,
        max_seq_length: int = 256,
        batch_size: int = 64,
        threads: int = 0,
        batch_tokens: int = 512,
    ) -> None:
        from transformers import AutoTokenizer

        self.runner = SessionPool(onnx_path, threads)
        self.session = self.runner.session
        self.workers = self.runner.workers
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        self.max_seq_length = min(max_seq_length, self.tokenizer.model_max_length or max_seq_length)
        self.batch_size = batch_size
        self.batch_tokens = batch_tokens
        # Texts tokenised and length-grouped together; 4,096 keeps batches full (SciFact).
        self.block = 4096
        self.model_id = model_id
        self.cache_id = f"{model_id}|{Path(onnx_path).stem}"
        self._fast, self._counter = self._rust_tokenizers()
        self.dim = int(self.session.get_outputs()[0].shape[-1] or self._probe_dim())

    def _rust_tokenizers(self) -> tuple[Any, Any]:
        """Own copies of the fast tokenizer: one truncating for the model, one counting.

        Copies, because tokenizer.json files carry their own padding/truncation settings
        (MiniLM's pads and truncates to 128), which transformers overrides per call.
        """
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:  # a slow (pure-Python) tokenizer: go through transformers
            return None, None
        from tokenizers import Tokenizer

        fast = Tokenizer.from_str(backend.to_str())
        fast.no_padding()
        fast.enable_truncation(self.max_seq_length)
        counter = Tokenizer.from_str(backend.to_str())
        counter.no_padding()
        counter.no_truncation()
        return fast, counter

    def _probe_dim(self) -> int:
        return int(self.encode(["dimension probe"]).shape[1])

    @classmethod
    def from_pretrained(
        cls,
        model_dir: Path,
        export_dir: Path,
        quantize: bool = True,
        max_seq_length: int = 256,
        batch_size: int = 64,
        threads: int = 0,
        name: str | None = None,
        batch_tokens: int = 512,
    ) -> OnnxEmbedder:
        """Load the cached export for this model, exporting it on first use."""
        export_dir.mkdir(parents=True, exist_ok=True)
        key = _fingerprint(model_dir, quantize, max_seq_length, _EXPORT_VERSION)
        path = export_dir / f"{key}.onnx"
        if not path.exists():
            export_onnx(model_dir, path, quantize)
        model_id = f"{name or model_dir.name}|onnx{'-int8' if quantize else ''}"
        return cls(path, model_dir, model_id, max_seq_length, batch_size, threads, batch_tokens)

    def _tokenize(self, texts: list[str]) -> tuple[list[list[int]], list[list[int]]]:
        """Token ids and type ids, truncated to ``max_seq_length``, special tokens added."""
        if self._fast is not None:
            encs = self._fast.encode_batch(texts)
            return [e.ids for e in encs], [e.type_ids for e in encs]
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_seq_length)
        ids = enc["input_ids"]
        types = enc.get("token_type_ids") or [[0] * len(x) for x in ids]
        return ids, types

    def encode(
        self, texts: Sequence[str], batch_size: int | None = None, show_progress: bool = False
    ) -> np.ndarray:
        texts = list(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        # A block at a time, so one huge call (a million texts through LangChain's
        # embed_documents, say) never holds every tokenisation in memory at once.
        for start in range(0, len(texts), self.block):
            ids, types = self._tokenize(texts[start : start + self.block])
            out[start : start + len(ids)] = self.runner.run_unpadded(
                ids, types, batch_size or self.batch_size, self.batch_tokens
            )
        return out

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        if self._counter is not None:
            return [
                len(e.ids)
                for e in self._counter.encode_batch(list(texts), add_special_tokens=False)
            ]
        enc = self.tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
        return [len(x) for x in enc]
