"""MoE language models: a nanoGPT-style LM with dense or MoE FFNs, its trainer and CLI.

See docs/moe_lm.md. Quick start::

    aiprime moe train --config configs/moe/shakespeare_moe.toml --out out/moe/run1
    aiprime moe generate out/moe/run1 --prompt "ROMEO:" --max-new-tokens 200
"""

from .data import BatchSampler, BPETokenizer, CharTokenizer, TextData
from .model import GPT, LMOutput, ModelConfig, MoESettings, ParamCounts
from .train import NonFiniteLossError, TrainConfig, load_config, load_for_inference, train

__all__ = [
    "GPT",
    "BPETokenizer",
    "BatchSampler",
    "CharTokenizer",
    "LMOutput",
    "MoESettings",
    "ModelConfig",
    "NonFiniteLossError",
    "ParamCounts",
    "TextData",
    "TrainConfig",
    "load_config",
    "load_for_inference",
    "train",
]
