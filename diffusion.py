"""The noise process, the training loss and the samplers (Analog Bits, Chen et al. 2022, in the
space of token embeddings).

Notation (code -> paper):
    x0        x_0      clean token embeddings, (B, L, E); each row has norm √E
    x_t       x_t      noisy embeddings at time t: √γ(t) x0 + √(1-γ(t)) ε
    eps       ε        standard Gaussian noise
    t         t        diffusion time in [0, 1]: 0 is clean, 1 is pure noise
    gamma     γ(t)     signal share ᾱ_t of DDPM; γ(0) = 1, γ(1) = 0
    x0_hat    x̂0       the Estimator's prediction of x0
    x_self    x̃0       self-conditioning input: the previous estimate, interpolated (0 if none)
    x_cond    c        clean embeddings at context positions, 0 elsewhere
    cond_mask          True at context positions: fed clean, kept fixed, never in the loss
    length_mask        True on real tokens (text + EOS); padding is attended by nothing
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class DiffusionConfig:
    schedule: str = "cosine"
    noise_scale: float = 1.0      # noise std relative to the schedule's; > 1 makes every t noisier
    self_cond_rate: float = 0.5   # share of training batches that get a self-conditioning pass
    ce_weight: float = 1.0        # loss = mse + ce_weight * ce
    sampler: str = "ddim"
    steps: int = 50               # default number of sampling steps


# --- noise schedules: t in [0, 1] -> γ(t), decreasing from 1 to 0 ---------------------------------

def gamma_cosine(t):
    """Nichol & Dhariwal 2021, eq. 17, without the offset: γ(t) = cos²(πt/2)."""
    return torch.cos(t * math.pi / 2).pow(2).clamp(0.0, 1.0)


SCHEDULES = {"cosine": gamma_cosine}


def get_schedule(name):
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose from {', '.join(SCHEDULES)}")
    return SCHEDULES[name]


# --- samplers: one step from time t to an earlier time s, given x̂0 -------------------------------

def ddim_step(x_t, x0_hat, gamma_t, gamma_s, gen=None):
    """Deterministic DDIM step (Song et al. 2021, eq. 12 with σ = 0): keep the implied noise ε̂,
    move the signal share from γ(t) to γ(s)."""
    eps_hat = (x_t - gamma_t.sqrt() * x0_hat) / (1 - gamma_t).clamp(min=1e-8).sqrt()
    return gamma_s.sqrt() * x0_hat + (1 - gamma_s).sqrt() * eps_hat


def ddpm_step(x_t, x0_hat, gamma_t, gamma_s, gen=None):
    """Ancestral DDPM step (Ho et al. 2020): a draw from the posterior q(x_s | x_t, x̂0), written
    as DDIM with η = 1 (Song et al. 2021, eq. 16)."""
    eps_hat = (x_t - gamma_t.sqrt() * x0_hat) / (1 - gamma_t).clamp(min=1e-8).sqrt()
    var = ((1 - gamma_s) / (1 - gamma_t).clamp(min=1e-8) * (1 - gamma_t / gamma_s)).clamp(min=0)
    noise = torch.randn(x_t.shape, generator=gen, device=x_t.device, dtype=x_t.dtype)
    return gamma_s.sqrt() * x0_hat + (1 - gamma_s - var).clamp(min=0).sqrt() * eps_hat + var.sqrt() * noise


SAMPLERS = {"ddim": ddim_step, "ddpm": ddpm_step}


def get_sampler(name):
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


class Diffusion:
    """Wraps an Estimator with the forward process, the loss and the samplers."""

    def __init__(self, model, cfg: DiffusionConfig):
        self.model, self.cfg = model, cfg
        self.net = model  # what the training forward calls: the model, or its DistributedDataParallel wrapper
        schedule = get_schedule(cfg.schedule)
        # Scaling the noise by s divides the signal-to-noise ratio γ/(1-γ) by s²; the endpoints stay.
        self.gamma = lambda t: (lambda g: g / (g + cfg.noise_scale ** 2 * (1 - g)))(schedule(t))
        get_sampler(cfg.sampler)  # fail now, not after training

    def inputs(self, ids, cond_mask):
        """Clean embeddings x0 and the context channel x_cond = x0 at context positions, else 0."""
        x0 = self.model.embeddings()[ids]  # (B, L, E)
        cond = cond_mask[..., None]  # (B, L, 1)
        return x0, torch.where(cond, x0, torch.zeros_like(x0))

    def loss(self, ids, length_mask, cond_mask, t=None, gen=None, eps=None, self_cond=None, denom=None):
        """MSE on x̂0 plus cross-entropy on the tied logits, both averaged over the positions to
        generate (inside the length mask, outside the context). Returns a dict of scalars:
        loss (to minimise), mse, ce and acc (token accuracy on those positions).

        t (B,), eps (B, L, E) and self_cond (bool) are drawn from `gen` unless given. `denom`
        replaces the local count of positions: with data parallelism, one count for the whole
        batch makes the averaged gradient that of one big batch."""
        B, L = ids.shape
        dev = ids.device
        if t is None:
            t = torch.rand(B, generator=gen, device=dev)  # (B,)
        x0, x_cond = self.inputs(ids, cond_mask)
        if eps is None:
            eps = torch.randn(x0.shape, generator=gen, device=dev)
        if self_cond is None:
            self_cond = torch.rand((), generator=gen, device=dev).item() < self.cfg.self_cond_rate
        cond = cond_mask[..., None]
        gamma = self.gamma(t)[:, None, None]  # (B, 1, 1)
        x_t = gamma.sqrt() * x0 + (1 - gamma).sqrt() * eps  # forward process q(x_t | x0)
        x_t = torch.where(cond, x0, x_t)  # context is fed clean

        x_self = torch.zeros_like(x0)
        # Self-conditioning (Chen et al. 2022, sec. 3.2): on some batches, a first pass without
        # gradient gives an estimate that the second pass sees as input, as it will when sampling.
        if self_cond:
            with torch.no_grad():
                first, _ = self.net(x_t, x_cond, x_self, t, length_mask)
                x_self = torch.where(cond, 0.0, self.model.interpolate(self.model.logits(first)).float())

        x0_hat, _ = self.net(x_t, x_cond, x_self, t, length_mask)
        x0_hat = x0_hat.float()
        logits = self.model.logits(x0_hat)  # (B, L, V)
        target = (length_mask & ~cond_mask).float()  # (B, L): positions to generate
        n = target.sum().clamp(min=1) if denom is None else denom
        mse = ((x0_hat - x0) ** 2).mean(-1)  # (B, L)
        ce = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none").view(B, L)
        acc = (logits.argmax(-1) == ids).float()
        out = {k: (v * target).sum() / n for k, v in (("mse", mse), ("ce", ce), ("acc", acc))}
        out["loss"] = out["mse"] + self.cfg.ce_weight * out["ce"]
        return out

    @torch.no_grad()
    def sample(self, ids, length_mask, cond_mask, steps=None, sampler=None, gen=None, on_step=None):
        """Generate token ids by denoising from pure noise in `steps` steps.

        ids:         (B, L) tokens; only those at context positions are read
        length_mask: (B, L) True on the positions to produce (the text and its EOS)
        cond_mask:   (B, L) True where ids are given; they stay fixed at every step
        on_step:     optional callback(step, ids) with the tokens decoded at each step
        Returns (B, L) ids: the given tokens at context positions, the model's elsewhere, PAD
        outside the length mask."""
        steps = steps or self.cfg.steps
        step_fn = get_sampler(sampler or self.cfg.sampler)
        if steps < 1:
            raise ValueError("steps must be at least 1")
        x0_ctx, x_cond = self.inputs(ids, cond_mask)
        cond = cond_mask[..., None]
        x_t = torch.randn(x0_ctx.shape, generator=gen, device=ids.device)  # x_1 ~ N(0, I)
        x_self = torch.zeros_like(x_t)
        ts = torch.linspace(1, 0, steps + 1, device=ids.device)
        for i in range(steps):
            t, s = ts[i], ts[i + 1]
            x_in = torch.where(cond, x0_ctx, x_t)
            x0_hat, _ = self.model(x_in, x_cond, x_self, t.expand(len(ids)), length_mask)
            logits = self.model.logits(x0_hat.float())
            # Step with the interpolated estimate: it lies among the token embeddings, where x0 lives.
            x0_hat = self.model.interpolate(logits).float()
            x_self = torch.where(cond, 0.0, x0_hat)
            x_t = step_fn(x_t, x0_hat, self.gamma(t), self.gamma(s), gen)
            tokens = torch.where(cond_mask, ids, logits.argmax(-1))
            tokens = torch.where(length_mask, tokens, 0)
            if on_step is not None:
                on_step(i, tokens)
        return tokens
