"""Text data for the LM: tokenizers, a 90/10 split and reproducible random batches.

Batches come from a seeded :class:`torch.Generator` whose state is checkpointed, so a
resumed run draws exactly the batches an uninterrupted run would have drawn.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

TokenizerKind = Literal["char", "bpe"]


class Tokenizer(Protocol):
    """What the trainer and ``generate`` need from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def to_json(self) -> dict[str, Any]: ...


class CharTokenizer:
    """One id per distinct character of the training text (sorted, so the ids are stable)."""

    def __init__(self, chars: list[str]) -> None:
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``; a character unseen in training is an error rather than a guess."""
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_json(self) -> dict[str, Any]:
        return {"kind": "char", "chars": self.chars}


class BPETokenizer:
    """tiktoken BPE (``gpt2`` by default). tiktoken is optional and imported lazily."""

    def __init__(self, encoding: str = "gpt2") -> None:
        try:
            import tiktoken
        except ImportError:
            raise ImportError(
                "tokenizer = 'bpe' needs tiktoken, which is not installed "
                "(pip install tiktoken), or use tokenizer = 'char'"
            ) from None
        self.encoding = encoding
        self._enc = tiktoken.get_encoding(encoding)

    @property
    def vocab_size(self) -> int:
        return int(self._enc.n_vocab)

    def encode(self, text: str) -> list[int]:
        return list(self._enc.encode_ordinary(text))

    def decode(self, ids: list[int]) -> str:
        return str(self._enc.decode(ids))

    def to_json(self) -> dict[str, Any]:
        return {"kind": "bpe", "encoding": self.encoding}


def tokenizer_from_json(d: dict[str, Any]) -> CharTokenizer | BPETokenizer:
    """Rebuild a tokenizer saved with ``to_json``."""
    if d.get("kind") == "char":
        return CharTokenizer(list(d["chars"]))
    if d.get("kind") == "bpe":
        return BPETokenizer(str(d.get("encoding", "gpt2")))
    raise ValueError(f"unknown tokenizer kind {d.get('kind')!r}")


def save_tokenizer(tok: Tokenizer, path: Path) -> None:
    path.write_text(json.dumps(tok.to_json(), ensure_ascii=False) + "\n", encoding="utf-8")


def load_tokenizer(path: Path) -> CharTokenizer | BPETokenizer:
    return tokenizer_from_json(json.loads(path.read_text(encoding="utf-8")))


class TextData:
    """Token ids of a text file, split into the first 90 % (train) and the last 10 % (val).

    A contiguous split (not a random one) keeps validation text unseen: random windows
    would overlap the training text.
    """

    def __init__(
        self,
        path: Path,
        tokenizer: TokenizerKind | CharTokenizer | BPETokenizer = "char",
        val_fraction: float = 0.1,
    ) -> None:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError("val_fraction must be in (0, 1)")
        text = Path(path).read_text(encoding="utf-8")
        if tokenizer == "char":
            tokenizer = CharTokenizer.from_text(text)
        elif tokenizer == "bpe":
            tokenizer = BPETokenizer()
        assert not isinstance(tokenizer, str)
        self.tokenizer: CharTokenizer | BPETokenizer = tokenizer
        ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
        n_train = int(len(ids) * (1.0 - val_fraction))
        self.train = ids[:n_train]
        self.val = ids[n_train:]


class BatchSampler:
    """Random ``(x, y)`` windows of ``block_size`` tokens; ``y`` is ``x`` shifted by one.

    Training batches use one generator seeded with ``seed`` (its state goes into the
    checkpoint). :meth:`eval_batches` uses a fresh generator with a fixed seed each call, so
    every evaluation scores the same windows and does not disturb the training stream.
    """

    def __init__(self, data: Tensor, block_size: int, batch_size: int, seed: int) -> None:
        if len(data) <= block_size:
            raise ValueError(f"{len(data)} tokens is too short for block_size {block_size}")
        self.data = data
        self.block_size = block_size
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def _draw(self, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        hi = len(self.data) - self.block_size
        starts = torch.randint(hi, (self.batch_size,), generator=gen)
        offs = torch.arange(self.block_size)
        x = self.data[starts[:, None] + offs]
        y = self.data[starts[:, None] + offs + 1]
        return x, y

    def next(self) -> tuple[Tensor, Tensor]:
        """The next training batch ``[batch_size, block_size]`` (int64)."""
        return self._draw(self.generator)

    def eval_batches(self, n: int, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
        """``n`` fixed batches (same for every call with the same ``seed``)."""
        gen = torch.Generator().manual_seed(seed)
        return [self._draw(gen) for _ in range(n)]

    def get_state(self) -> list[int]:
        """Generator state as ints, for the JSON part of a checkpoint."""
        return self.generator.get_state().tolist()

    def set_state(self, state: list[int]) -> None:
        self.generator.set_state(torch.tensor(state, dtype=torch.uint8))
