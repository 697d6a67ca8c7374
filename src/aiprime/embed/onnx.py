"""Fast CPU backend: the sentence-transformers model exported to ONNX Runtime.

The graph includes pooling and L2 normalisation, so one ``run`` gives final embeddings.
Optional int8 dynamic quantisation (per-channel weights) roughly doubles CPU throughput
on VNNI hardware; its retrieval cost is measured in docs/results.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


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


def _fingerprint(model_dir: Path, quantize: bool, max_len: int) -> str:
    h = hashlib.sha256(f"v2|{quantize}|{max_len}".encode())
    for f in sorted(model_dir.iterdir()):
        if f.is_file() and f.suffix in {".json", ".safetensors", ".bin", ".txt"}:
            st = f.stat()
            h.update(f"{f.name}|{st.st_size}|{int(st.st_mtime)}".encode())
    return f"{model_dir.name}-{h.hexdigest()[:12]}"


def export_onnx(model_dir: Path, out_path: Path, quantize: bool) -> Path:
    """Export model + pooling + normalisation to ONNX, fuse, optionally quantise to int8."""
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

    class _Wrapped(torch.nn.Module):
        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor,
        ) -> torch.Tensor:
            h = self.m(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            if pooling == "cls":
                e = h[:, 0]
            else:
                mask = attention_mask.unsqueeze(-1).to(h.dtype)
                e = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(e, dim=-1)

    sample = tok(
        ["export sample", "a second, longer export sample"], padding=True, return_tensors="pt"
    )
    if "token_type_ids" not in sample:
        sample["token_type_ids"] = torch.zeros_like(sample["input_ids"])
    dyn: dict[str, Any] = {k: {0: "batch", 1: "seq"} for k in _INPUTS}
    dyn["embedding"] = {0: "batch"}
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer chatter about constant shapes
            torch.onnx.export(
                _Wrapped(model),
                tuple(sample[k] for k in _INPUTS),
                str(raw),
                input_names=list(_INPUTS),
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


def cpu_session(path: Path, threads: int = 0) -> Any:
    """An ONNX Runtime CPU session with full graph optimisation; 0 threads = all cores."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or (os.cpu_count() or 1)
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class OnnxEmbedder:
    """sentence-transformers-compatible ``encode`` on ONNX Runtime."""

    def __init__(
        self,
        onnx_path: Path,
        tokenizer_dir: Path,
        model_id: str,
        max_seq_length: int = 256,
        batch_size: int = 64,
        threads: int = 0,
    ) -> None:
        from transformers import AutoTokenizer

        self.session = cpu_session(onnx_path, threads)
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        self.max_seq_length = min(max_seq_length, self.tokenizer.model_max_length or max_seq_length)
        self.batch_size = batch_size
        self.model_id = model_id
        self.cache_id = f"{model_id}|{Path(onnx_path).stem}"
        self.dim = int(self.session.get_outputs()[0].shape[-1] or self._probe_dim())

    def _probe_dim(self) -> int:
        return int(self._run(["dimension probe"]).shape[1])

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
    ) -> OnnxEmbedder:
        """Load the cached export for this model, exporting it on first use."""
        export_dir.mkdir(parents=True, exist_ok=True)
        key = _fingerprint(model_dir, quantize, max_seq_length)
        path = export_dir / f"{key}.onnx"
        if not path.exists():
            export_onnx(model_dir, path, quantize)
        model_id = f"{name or model_dir.name}|onnx{'-int8' if quantize else ''}"
        return cls(path, model_dir, model_id, max_seq_length, batch_size, threads)

    def _run(self, texts: list[str]) -> np.ndarray:
        enc = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_seq_length,
            return_tensors="np",
        )
        feeds = {k: enc[k].astype(np.int64) for k in _INPUTS if k in enc}
        if "token_type_ids" not in feeds:
            feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
        return np.asarray(self.session.run(None, feeds)[0], dtype=np.float32)

    def encode(
        self, texts: Sequence[str], batch_size: int | None = None, show_progress: bool = False
    ) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        bs = batch_size or self.batch_size
        # Length-sorted batches waste little compute on padding (as sentence-transformers does).
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for i in range(0, len(texts), bs):
            idx = order[i : i + bs]
            out[idx] = self._run([texts[j] for j in idx])
        return out

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        enc = self.tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
        return [len(x) for x in enc]
