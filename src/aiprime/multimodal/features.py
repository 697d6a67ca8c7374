"""Text features of a locked text tower, computed once per distinct string.

With the text backbone frozen (LiT), its output for a caption never changes, so a CPU run
embeds each caption and each augmentation variant once and trains the heads and the image
tower from the cached rows. Stored as safetensors plus a JSON list of the strings.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from aiprime.multimodal.model import DualEncoder


class TextFeatureCache:
    def __init__(self, cache_dir: Path, backbone_id: str) -> None:
        tag = hashlib.sha256(backbone_id.encode()).hexdigest()[:12]
        self.path = Path(cache_dir) / f"text-{tag}.safetensors"
        self.index_path = self.path.with_suffix(".json")
        self.rows: dict[str, int] = {}
        self.feats = torch.zeros(0)
        if self.path.is_file() and self.index_path.is_file():
            texts = json.loads(self.index_path.read_text())
            self.feats = load_file(str(self.path))["features"]
            if len(texts) == len(self.feats):
                self.rows = {t: i for i, t in enumerate(texts)}

    def get(
        self,
        model: DualEncoder,
        texts: Sequence[str],
        batch: int = 256,
        progress: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Features of ``texts`` (rows in the same order); missing ones are computed."""
        todo = list(dict.fromkeys(t for t in texts if t not in self.rows))
        if todo:
            new = []
            with torch.no_grad():
                for s in range(0, len(todo), batch):
                    part = todo[s : s + batch]
                    new.append(model.text_features(model.tokenize(part)).float())
                    if progress:
                        progress(len(part))
            start = len(self.rows)
            self.feats = (
                torch.cat([self.feats.view(-1, new[0].shape[1]), *new])
                if self.rows
                else torch.cat(new)
            )
            for i, t in enumerate(todo):
                self.rows[t] = start + i
            self._save()
        idx = torch.tensor([self.rows[t] for t in texts], dtype=torch.long)
        return self.feats[idx]

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        save_file({"features": self.feats.contiguous()}, str(tmp))
        texts = sorted(self.rows, key=self.rows.__getitem__)
        itmp = self.index_path.with_suffix(f".{os.getpid()}.jtmp")
        itmp.write_text(json.dumps(texts))
        tmp.replace(self.path)
        itmp.replace(self.index_path)
