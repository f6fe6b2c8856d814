"""The Estimator: a transformer that reads noisy token embeddings and predicts the clean ones, x̂0.

Input at each position: [noisy embedding x_t ; clean context embedding (0 where not context) ;
self-conditioning estimate (0 on the first pass)], projected to the model width, plus embeddings of
the position counted from the start and from the end of the text. Then pre-norm
blocks whose LayerNorms have no parameters of their own: each is followed by a FiLM scale and shift
computed from the time t (Perez et al. 2018), so every block knows how noisy its input is.

The read-out against the token embeddings (tied logits) lives here too: the chunked cross-entropy
that the loss uses, and the interpolation that the sampler steps with.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from rotary_embedding_torch import RotaryEmbedding


@dataclass
class ModelConfig:
    backbone: str = "estimator"  # a name in BACKBONES: the denoiser network
    vocab_size: int = 4000
    max_len: int = 64       # longest text the model sees, EOS included
    embed_dim: int = 64     # token embedding width E: the space the diffusion runs in
    width: int = 256        # transformer width D
    depth: int = 4          # number of blocks
    heads: int = 4
    mlp_ratio: int = 4
    time_dim: int = 128     # width of the time embedding that drives FiLM

    def validate(self):
        if self.width % self.heads or (self.width // self.heads) % 2:
            raise ValueError(f"width {self.width} must split into {self.heads} heads of even size")
        for k in ("vocab_size", "max_len", "embed_dim", "width", "depth", "heads", "mlp_ratio", "time_dim"):
            if getattr(self, k) < 1:
                raise ValueError(f"model config: {k} must be positive")


# Named presets: functions returning a config, registered by name (cf. fairseq2's architecture registry).
PRESETS = {}


def preset(fn):
    PRESETS[fn.__name__] = fn
    return fn


@preset
def tiny():
    """~0.2 M parameters: tests, seconds on a CPU."""
    return ModelConfig(embed_dim=16, width=64, depth=2, heads=2, time_dim=32)


@preset
def small():
    """~4 M parameters: train.py's default; the reference's 4-layer, width-256 configuration."""
    return ModelConfig(embed_dim=64, width=256, depth=4, heads=4, time_dim=128)


@preset
def cpu():
    """~1 M parameters: `small` made narrower and shallower, so that minutes of a CPU take it
    through more steps (2.6x those of `small` on E2E). For ten minutes there, at two seeds, it
    infilled better than width 192 and 7-11 points above `small`'s plain recipe (two sets of
    held-out lines), and sampled as well as width 192 or better (EXPERIMENTS.md, "Smaller still")."""
    return ModelConfig(embed_dim=64, width=128, depth=3, heads=4, time_dim=64)


@preset
def base():
    """~96 M parameters: for a GPU."""
    return ModelConfig(embed_dim=128, width=768, depth=12, heads=12, time_dim=256, max_len=128)


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]()


def row_chunks(n: int, vocab_size: int, floats: int = 1 << 20):
    """Slices of n rows, each small enough that its (rows, vocab_size) logits hold about
    `floats` numbers (4 MB): they stay in cache and need no fresh memory from the system."""
    step = max(1, floats // vocab_size)
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


class TiedCrossEntropy(torch.autograd.Function):
    """Cross-entropy of the logits x @ w.T against `target`, and their argmax, without ever holding
    all the (N, V) logits: they are computed a chunk of rows at a time in forward, and recomputed in
    backward (one more (N, E) x (E, V) matmul, about 2% of a training step's FLOPs). On a CPU the
    plain way, which stores the logits, their log-softmax and the gradient of each, cost more time
    than the whole transformer: fresh 64 MB tensors mean page faults on every pass.

    Given the (V, E) embeddings `e`, it also returns softmax(logits) @ e, the expected embedding
    under the logits' distribution (else an empty tensor), in the same chunks."""

    @staticmethod
    def forward(ctx, x, w, target, e):  # x: (N, E); w: (V, E); target: (N,); e: (V, E) or None
        ce, pred = torch.empty(len(x), device=x.device), torch.empty_like(target)
        mix = torch.empty_like(x) if e is not None else x.new_empty(0)
        for rows in row_chunks(len(x), len(w)):
            logits = x[rows] @ w.t()  # (n, V)
            lse = logits.logsumexp(-1)  # (n,)
            ce[rows] = lse - logits.gather(1, target[rows, None])[:, 0]
            pred[rows] = logits.argmax(-1)
            if e is not None:
                mix[rows] = (logits - lse[:, None]).exp_() @ e
        ctx.save_for_backward(x, w, target, e)
        ctx.mark_non_differentiable(pred)
        return ce, pred, mix

    @staticmethod
    def backward(ctx, grad_ce, grad_pred, grad_mix):
        x, w, target, e = ctx.saved_tensors
        mixed = e is not None  # autograd passes zeros for an output left unused
        grad_x, grad_w = torch.empty_like(x), torch.zeros_like(w)
        grad_e = torch.zeros_like(e) if mixed else None
        for rows in row_chunks(len(x), len(w)):
            p = (x[rows] @ w.t()).softmax(-1)  # (n, V)
            g = p * grad_ce[rows, None]  # d ce / d logits = softmax - one-hot
            g[torch.arange(len(g), device=g.device), target[rows]] -= grad_ce[rows]
            if mixed:  # d (p @ e) / d logits: p * (a - p . a), with a = grad_mix @ e.T
                a = grad_mix[rows] @ e.t()  # (n, V)
                g += p * (a - (p * a).sum(-1, keepdim=True))
                grad_e.addmm_(p.t(), grad_mix[rows])
            grad_x[rows] = g @ w
            grad_w.addmm_(g.t(), x[rows])
        return grad_x, grad_w, None, grad_e


def tied_cross_entropy(x, w, target, e=None):
    """(N, E) estimates, (V, E) read-out, (N,) targets -> per-row cross-entropy and argmax, in
    float32; and, given the (V, E) embeddings `e`, the (N, E) expected embedding too."""
    with torch.autocast("cuda" if x.is_cuda else "cpu", enabled=False):
        ce, pred, mix = TiedCrossEntropy.apply(x.float(), w.float(), target, None if e is None else e.float())
    return (ce, pred) if e is None else (ce, pred, mix)


class TimeEmbedding(nn.Module):
    """t in [0, 1] -> sinusoidal features -> MLP, as in DDPM (Ho et al. 2020)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("freqs", torch.exp(-math.log(10_000) * torch.arange(dim // 2) / (dim // 2)), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, t):  # t: (B,)
        angles = 1000 * t[:, None] * self.freqs[None]  # (B, dim/2); x1000 so that t in [0,1] spans many periods
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=-1))  # (B, dim)


def film_norm(x, scale, shift):
    """LayerNorm without affine parameters, then the time-dependent FiLM scale and shift."""
    return F.layer_norm(x, x.shape[-1:]) * (1 + scale) + shift


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)  # one fused projection instead of three
        self.out = nn.Linear(cfg.width, cfg.width)
        self.rotary = rotary  # shared by all blocks; its cos/sin tables are cached per length

    def forward(self, x, attn_mask):  # x: (B, L, D); attn_mask: (B, 1, 1, L), True = may attend
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, H, L, Dh)
        q, k = self.rotary.rotate_queries_or_keys(qkv[:2])  # queries and keys in one call
        y = F.scaled_dot_product_attention(q, k, qkv[2], attn_mask=attn_mask)  # (B, H, L, Dh)
        return self.out(y.transpose(1, 2).reshape(B, L, D))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = nn.Linear(cfg.width, cfg.mlp_ratio * cfg.width)
        self.down = nn.Linear(cfg.mlp_ratio * cfg.width, cfg.width)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        self.attn = Attention(cfg, rotary)
        self.ff = FeedForward(cfg)

    def forward(self, x, film, attn_mask):  # film: (4, B, 1, D) = scale1, shift1, scale2, shift2
        x = x + self.attn(film_norm(x, film[0], film[1]), attn_mask)
        x = x + self.ff(film_norm(x, film[2], film[3]))
        return x


class Denoiser(nn.Module):
    """What every backbone is: the token space (embeddings, tied logits, interpolation) plus a network.

    A backbone subclasses this and implements
        forward(x_t, x_cond, x_self, t, length_mask) -> x0_hat
    x_t     (B, L, E)  noisy embeddings; at context positions the clean ones
    x_cond  (B, L, E)  clean embeddings at context positions, 0 elsewhere
    x_self  (B, L, E)  the previous estimate of x0 (self-conditioning), 0 on a first pass
    t       (B,)       diffusion time in [0, 1]; 1 is pure noise
    length_mask (B, L) bool, True on the text and its EOS; the network must ignore other positions
    x0_hat  (B, L, E)  the estimate of the clean embeddings x0, any dtype (the loss casts to float32)
    and registers itself with @register_backbone("name"). Its constructor takes the ModelConfig alone,
    so that a checkpoint rebuilds it. Diffusion, training, sampling and evaluation need nothing else.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.embed_dim)  # N(0, 1): only the direction counts
        # Logits are tied to the embeddings: logit_v = <x̂0, ê_v> * logit_scale. Tying gives the
        # embedding table a reason to keep tokens apart: with MSE alone, all embeddings collapsing
        # onto one vector would be a perfect (and useless) solution (Diffusion-LM, Li et al. 2022).
        # The scale is learnt in log space, so it can sharpen quickly; it starts at 2/√E, which puts
        # the logit of an exact match at 2E, sharp enough to tell thousands of tokens apart.
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(2 / math.sqrt(cfg.embed_dim))))
        # The length of a gap of open length ([gap:..N]), read from the estimate at its marker, a
        # context position holding PAD (data.collapse_gaps): (..., E) -> logits of a gap of 0 .. max_len - 1 tokens.
        self.gap_head = nn.Linear(cfg.embed_dim, cfg.max_len)

    def embeddings(self):
        """The (V, E) embedding table, each row L2-normalised and scaled to norm √E, so every
        coordinate has unit scale like the Gaussian noise it is mixed with; and no embedding can
        grow its norm to escape the noise (a trivial way to lower the loss)."""
        return F.normalize(self.embedding.weight, dim=-1) * math.sqrt(self.cfg.embed_dim)

    def readout(self):
        """The (V, E) matrix of the tied logits, logits = x̂0 @ readout().T: the normalised
        embeddings times the learnt scale. Scaling this small table, not the (B, L, V) logits,
        saves a pass over the largest tensor of the model."""
        return self.embeddings() * self.log_logit_scale.exp()

    def logits(self, x0_hat):  # (..., E) -> (..., V)
        return x0_hat @ self.readout().t()

    @torch.no_grad()
    def interpolate(self, x0_hat, temperature: float = 1.0, banned=(), at=None):
        """(..., E) -> (softmax(logits / temperature) @ embeddings, argmax of the logits): the
        expected embedding under the model's token distribution (CDCD's score interpolation,
        Dieleman et al. 2022) and the most likely token. A temperature below 1 pulls the estimate
        towards the likeliest token's embedding. Computed a few hundred rows at a time, so the
        (rows, V) logits stay small: on a CPU, allocating the whole (B, L, V) tensor costs more
        than the matmul. `banned`: token ids given no probability and never chosen, at the positions
        where `at` (...) is True (default: everywhere)."""
        x = x0_hat.reshape(-1, x0_hat.shape[-1]).float()  # (N, E)
        banned, at = list(banned), None if at is None else at.reshape(-1)  # at: (N,)
        emb = self.embeddings().float()  # (V, E), normalised once
        w = emb * (self.log_logit_scale.exp() / temperature)  # (V, E): readout() / temperature
        out, tokens = torch.empty_like(x), torch.empty(len(x), dtype=torch.long, device=x.device)
        for rows in row_chunks(len(x), len(w)):
            logits = x[rows] @ w.t()  # (n, V)
            if banned:  # sampling; training's self-conditioning bans nothing
                cols = logits[:, banned]  # (n, len(banned))
                logits[:, banned] = cols.fill_(float("-inf")) if at is None else cols.masked_fill(at[rows, None], float("-inf"))
            out[rows], tokens[rows] = logits.softmax(-1) @ emb, logits.argmax(-1)
        return out.view(x0_hat.shape), tokens.view(x0_hat.shape[:-1])

    def forward(self, x_t, x_cond, x_self, t, length_mask):
        raise NotImplementedError("a backbone implements forward(x_t, x_cond, x_self, t, length_mask) -> x0_hat")


# Backbones by name (cf. the backbone registries of the discrete-diffusion libraries): ModelConfig's
# `backbone` names the class, so a checkpoint rebuilds whichever network it was trained with.
BACKBONES = {}


def register_backbone(name: str):
    """Class decorator: make a Denoiser subclass buildable as `--backbone name`. A later
    registration under the same name replaces the earlier one."""
    def add(cls):
        if not (isinstance(cls, type) and issubclass(cls, Denoiser)):
            raise TypeError(f"backbone {name!r} must be a subclass of model.Denoiser")
        BACKBONES[name] = cls
        return cls
    return add


def build_model(cfg: ModelConfig) -> Denoiser:
    """The backbone that cfg.backbone names, freshly initialised."""
    if cfg.backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {cfg.backbone!r}; choose from {', '.join(BACKBONES)} "
                         f"(a backbone of your own must be registered before use: import its module)")
    return BACKBONES[cfg.backbone](cfg)


@register_backbone("estimator")
class Estimator(Denoiser):
    """The default backbone: pre-norm transformer blocks with rotary attention, FiLM time scaling
    of every LayerNorm, and embeddings of the position from the start and from the end."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        E, D = cfg.embed_dim, cfg.width
        self.time = TimeEmbedding(cfg.time_dim)
        # FiLM for every LayerNorm (2 a block, 1 final), computed in one matmul: (scale, shift) pairs
        self.film = nn.Linear(cfg.time_dim, (2 * cfg.depth + 1) * 2 * D)
        self.rotary = RotaryEmbedding(dim=D // cfg.heads, cache_max_seq_len=cfg.max_len)
        self.inp = nn.Linear(3 * E, D)
        # Rotary attention knows relative offsets only. Position from the start and from the end
        # tell each position where it stands, which gap positions (all alike at t = 1) need from the
        # first step: without them the model learned to use its context many times more slowly.
        self.pos_start = nn.Embedding(cfg.max_len, D)
        self.pos_end = nn.Embedding(cfg.max_len, D)
        self.blocks = nn.ModuleList(Block(cfg, self.rotary) for _ in range(cfg.depth))
        self.out = nn.Linear(D, E)
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.pos_start.weight, std=0.02)
        nn.init.normal_(self.pos_end.weight, std=0.02)
        # zero FiLM: every LayerNorm starts as a plain LayerNorm, whatever t is
        nn.init.zeros_(self.film.weight)
        # residual branches start small (GPT-2's scaled init), so the stack starts near identity
        for b in self.blocks:
            nn.init.normal_(b.attn.out.weight, std=0.02 / math.sqrt(2 * self.cfg.depth))
            nn.init.normal_(b.ff.down.weight, std=0.02 / math.sqrt(2 * self.cfg.depth))

    def forward(self, x_t, x_cond, x_self, t, length_mask):
        """x_t, x_cond, x_self: (B, L, E); t: (B,) in [0, 1]; length_mask: (B, L) bool -> x̂0 (B, L, E)."""
        B, L, _ = x_t.shape
        D = self.cfg.width
        film = self.film(self.time(t)).view(B, 2 * self.cfg.depth + 1, 2, 1, D).permute(1, 2, 0, 3, 4)  # (N, 2, B, 1, D)
        attn_mask = length_mask[:, None, None, :]  # (B, 1, 1, L): padding is never attended to
        pos = torch.arange(L, device=x_t.device)  # (L,)
        to_end = (length_mask.sum(1, keepdim=True) - 1 - pos).clamp(min=0)  # (B, L)
        h = self.inp(torch.cat([x_t, x_cond, x_self], dim=-1)) + self.pos_start(pos) + self.pos_end(to_end)  # (B, L, D)
        for i, block in enumerate(self.blocks):
            h = block(h, film[2 * i: 2 * i + 2].flatten(0, 1), attn_mask)
        return self.out(film_norm(h, film[-1, 0], film[-1, 1]))
