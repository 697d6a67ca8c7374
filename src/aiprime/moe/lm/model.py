"""A decoder-only transformer LM (nanoGPT style) whose FFNs are dense or MoE by config.

Everything except the FFN is shared between the dense and MoE variants, so a comparison
between them measures routing, not incidental architecture differences: both FFN kinds
use the same activation, have no biases and get the same (GPT-2) initialisation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from aiprime.moe.config import Activation, MoEConfig, RouterKind, ScoreFunc
from aiprime.moe.experts import DenseFFN
from aiprime.moe.layer import MoELayer
from aiprime.moe.stats import MoEStats


@dataclass
class MoESettings:
    """The MoE FFN of the LM: :class:`MoEConfig` without the fields the model fixes.

    ``expert_dropout``: :class:`MoELayer` has no dropout inside its experts, so this
    dropout is applied to the MoE branch output instead (Switch Transformer uses a higher
    rate on experts than elsewhere; ``None`` means the model's ``dropout``).
    """

    n_experts: int = 8
    top_k: int = 2
    d_ff: int = 256
    router: RouterKind = "topk"
    score_func: ScoreFunc = "softmax"
    renormalize: bool = True
    jitter: float = 0.0
    capacity_factor_train: float | None = None
    capacity_factor_eval: float | None = None
    n_shared_experts: int = 0
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    bias_balancing: bool = False
    bias_update_rate: float = 1e-3
    expert_dropout: float | None = None

    def layer_config(self, d_model: int, activation: Activation) -> MoEConfig:
        """The :class:`MoEConfig` of one MoE layer of a model of width ``d_model``."""
        kw = asdict(self)
        kw.pop("expert_dropout")
        return MoEConfig(d_model=d_model, activation=activation, **kw)


@dataclass
class ModelConfig:
    """Shape of the LM. ``moe_every``: 0 = all FFNs dense, 1 = every layer MoE, k = every
    k-th layer MoE (layers k-1, 2k-1, ..., so a 2-layer model with k=2 ends with an MoE)."""

    vocab_size: int = 65
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    d_ff: int = 512
    activation: Activation = "gelu"
    dropout: float = 0.0
    bias: bool = True
    moe_every: int = 0
    moe: MoESettings = field(default_factory=MoESettings)

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):  # from TOML/JSON
            self.moe = MoESettings(**self.moe)
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} not divisible by n_head={self.n_head}")
        if self.moe_every < 0:
            raise ValueError("moe_every must be >= 0")
        if self.moe_every and self.moe.router == "expert_choice":
            # Expert choice looks at later tokens of the batch (see docs/moe.md).
            raise ValueError("expert_choice routing is not causal; use router = 'topk' in an LM")

    def is_moe_layer(self, i: int) -> bool:
        """Whether block ``i`` uses the MoE FFN."""
        return self.moe_every > 0 and (i + 1) % self.moe_every == 0


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(b, t, d)
        return self.resid_dropout(self.proj(y))


class Block(nn.Module):
    """Pre-LN transformer block; the FFN is a :class:`DenseFFN` or a :class:`MoELayer`."""

    def __init__(
        self, cfg: ModelConfig, moe: bool, ep_group: dist.ProcessGroup | None = None
    ) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.ffn: DenseFFN | MoELayer
        if moe:
            self.ffn = MoELayer(cfg.moe.layer_config(cfg.d_model, cfg.activation), ep_group)
            p = cfg.moe.expert_dropout
            self.ffn_dropout = nn.Dropout(cfg.dropout if p is None else p)
        else:
            self.ffn = DenseFFN(cfg.d_model, cfg.d_ff, cfg.activation)
            self.ffn_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> tuple[Tensor, MoEStats | None]:
        x = x + self.attn(self.ln_1(x))
        stats: MoEStats | None = None
        if isinstance(self.ffn, MoELayer):
            h, stats = self.ffn(self.ln_2(x))
        else:
            h = self.ffn(self.ln_2(x))
        return x + self.ffn_dropout(h), stats


@dataclass
class LMOutput:
    """``loss`` is the cross-entropy alone (what to report); optimise ``loss + aux_loss``.

    ``aux_loss`` is the sum of the already-weighted balance and z losses of all MoE layers
    (0 for a dense model); ``stats`` has one entry per MoE layer, in layer order.
    """

    logits: Tensor
    loss: Tensor | None
    aux_loss: Tensor
    stats: list[MoEStats]


@dataclass(frozen=True)
class ParamCounts:
    """``active`` counts what one token touches: non-expert weights plus ``top_k`` routed
    experts per MoE layer. ``router`` (included in both) is reported apart because it is
    the only active-parameter difference between an MoE model and its dense twin."""

    total: int
    active: int
    router: int
    embedding: int


class GPT(nn.Module):
    """Token + learned position embeddings, pre-LN blocks, tied LM head.

    With ``ep_group`` every MoE layer holds only this rank's ``n_experts / world`` experts
    (expert parallelism); load weights sharded with
    :func:`aiprime.moe.parallel.shard_expert_state_dict` so it equals the full model.
    """

    def __init__(self, cfg: ModelConfig, ep_group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.block_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(cfg, cfg.is_moe_layer(i), ep_group) for i in range(cfg.n_layer)
        )
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 init for dense and expert weights alike (residual outputs scaled down by
        ``sqrt(2 * n_layer)``); routers keep their own ``router_init_std``."""
        std = 0.02
        out_std = std / math.sqrt(2 * self.config.n_layer)
        nn.init.normal_(self.wte.weight, std=std)
        nn.init.normal_(self.wpe.weight, std=std)
        for blk in self.blocks:
            assert isinstance(blk, Block)
            for lin, s in ((blk.attn.qkv, std), (blk.attn.proj, out_std)):
                nn.init.normal_(lin.weight, std=s)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            pairs: list[tuple[Tensor, Tensor]] = []
            if isinstance(blk.ffn, MoELayer):
                pairs.append((blk.ffn.experts.w_in, blk.ffn.experts.w_out))
                if blk.ffn.shared_experts is not None:
                    sh = blk.ffn.shared_experts
                    pairs.append((sh.w_in.weight, sh.w_out.weight))
            else:
                pairs.append((blk.ffn.w_in.weight, blk.ffn.w_out.weight))
            for w_in, w_out in pairs:
                nn.init.normal_(w_in, std=std)
                nn.init.normal_(w_out, std=out_std)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> LMOutput:
        """``idx`` ``[B, T]`` token ids; ``targets`` ``[B, T]`` (``-1`` is ignored)."""
        _, t = idx.shape
        if t > self.config.block_size:
            raise ValueError(f"sequence length {t} > block_size {self.config.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        stats: list[MoEStats] = []
        for blk in self.blocks:
            x, s = blk(x)
            if s is not None:
                stats.append(s)
        x = self.ln_f(x)
        logits = F.linear(x, self.wte.weight)  # weight tying without a shared tensor
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1
            )
        aux = sum((s.aux_loss for s in stats), start=x.new_zeros(()))
        return LMOutput(logits=logits, loss=loss, aux_loss=aux, stats=stats)

    def param_counts(self) -> ParamCounts:
        """Total and per-token active parameters (embeddings included, tied head once)."""
        total = sum(p.numel() for p in self.parameters())
        inactive = 0
        router = 0
        for m in self.modules():
            if isinstance(m, MoELayer):
                c = m.config
                experts = sum(p.numel() for p in m.experts.parameters())
                inactive += experts - experts * c.top_k // c.n_experts
                router += sum(p.numel() for p in m.router.parameters())
        emb = self.wte.weight.numel() + self.wpe.weight.numel()
        return ParamCounts(total=total, active=total - inactive, router=router, embedding=emb)

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``idx`` ``[B, T]``; the context is
        cropped to ``block_size``. ``top_k=1`` (or ``temperature=0``) is greedy decoding.
        Runs in eval mode (no dropout, eval capacity) and restores the previous mode."""
        was_training = self.training
        self.eval()
        try:
            for _ in range(max_new_tokens):
                ctx = idx[:, -self.config.block_size :]
                logits = self(ctx).logits[:, -1, :]
                if temperature <= 0 or top_k == 1:
                    nxt = logits.argmax(dim=-1, keepdim=True)
                else:
                    logits = logits / temperature
                    if top_k is not None:
                        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                        logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
                    probs = F.softmax(logits, dim=-1)
                    nxt = torch.multinomial(probs, 1, generator=generator)
                idx = torch.cat((idx, nxt), dim=1)
        finally:
            self.train(was_training)
        return idx
