"""Text data for the LM: tokenizers, a 90/10 split and reproducible random batches.

Batches come from a seeded :class:`torch.Generator` whose state is checkpointed, so a
resumed run draws exactly the batches an uninterrupted run would have drawn.
"""

from __future__ import annotations

import base64
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


# GPT-2's pre-tokenisation regex (tiktoken's r50k/gpt2 pattern), used for rank files
# loaded from disk so they split text exactly as the named ``gpt2`` encoding does.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _import_tiktoken() -> Any:
    try:
        import tiktoken
    except ImportError:
        raise ImportError(
            "tokenizer = 'bpe' needs tiktoken, which is not installed "
            "(pip install tiktoken), or use tokenizer = 'char'"
        ) from None
    return tiktoken


class BPETokenizer:
    """tiktoken byte-level BPE. tiktoken is optional and imported lazily.

    ``encoding`` is a tiktoken encoding name (``gpt2``, the default: tiktoken downloads its
    ranks on first use and caches them, so it needs the network once) or the path of a
    ``.tiktoken`` rank file (one ``base64(token) rank`` per line, tiktoken's own format),
    which works offline. A file's ranks are stored in the checkpoint (``ranks``), so a
    checkpoint never depends on the file still being there.
    """

    def __init__(self, encoding: str = "gpt2", ranks: dict[bytes, int] | None = None) -> None:
        tiktoken = _import_tiktoken()
        self.encoding = encoding
        self._ranks: dict[bytes, int] | None = None
        if ranks is None and is_rank_file(encoding):
            from tiktoken.load import load_tiktoken_bpe

            path = Path(encoding).expanduser()
            if not path.exists():
                raise FileNotFoundError(f"BPE rank file {path} not found")
            ranks = load_tiktoken_bpe(str(path))
        if ranks is not None:
            self._ranks = ranks
            self._enc = tiktoken.Encoding(
                name=Path(encoding).stem, pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                special_tokens={},
            )  # fmt: skip
            return
        try:
            self._enc = tiktoken.get_encoding(encoding)
        except Exception as e:  # network errors (offline), unknown names, corrupt caches
            raise ValueError(
                f"could not load the tiktoken encoding {encoding!r} ({type(e).__name__}: "
                f"{str(e)[:200]}). tiktoken downloads named encodings on first use and caches "
                "them (TIKTOKEN_CACHE_DIR); offline, set data.bpe_encoding to a local "
                ".tiktoken rank file"
            ) from None

    @property
    def vocab_size(self) -> int:
        return int(self._enc.n_vocab)

    def encode(self, text: str) -> list[int]:
        return list(self._enc.encode_ordinary(text))

    def decode(self, ids: list[int]) -> str:
        return str(self._enc.decode(ids))

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": "bpe", "encoding": self.encoding}
        if self._ranks is not None:
            d["ranks"] = [[base64.b64encode(t).decode("ascii"), r] for t, r in self._ranks.items()]
        return d


def is_rank_file(encoding: str) -> bool:
    """A path rather than a tiktoken name: names never contain a separator or a suffix."""
    return "/" in encoding or "\\" in encoding or encoding.endswith(".tiktoken")


def tokenizer_from_json(d: dict[str, Any]) -> CharTokenizer | BPETokenizer:
    """Rebuild a tokenizer saved with ``to_json``."""
    if d.get("kind") == "char":
        return CharTokenizer(list(d["chars"]))
    if d.get("kind") == "bpe":
        ranks = d.get("ranks")
        return BPETokenizer(
            str(d.get("encoding", "gpt2")),
            None if ranks is None else {base64.b64decode(t): int(r) for t, r in ranks},
        )
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
        bpe_encoding: str = "gpt2",
    ) -> None:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError("val_fraction must be in (0, 1)")
        text = Path(path).read_text(encoding="utf-8")
        if tokenizer == "char":
            tokenizer = CharTokenizer.from_text(text)
        elif tokenizer == "bpe":
            tokenizer = BPETokenizer(bpe_encoding)
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
