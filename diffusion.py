"""The noise process, the training loss and the samplers (Analog Bits, Chen et al. 2022, in the
space of token embeddings).

Notation (code -> paper):
    x0        x_0      clean token embeddings, (B, L, E); each row has norm √E
    x_t       x_t      noisy embeddings at time t: √γ(t) x0 + √(1-γ(t)) ε
    eps       ε        standard Gaussian noise
    t         t        diffusion time in [0, 1]: 0 is clean, 1 is pure noise
    gamma     γ(t)     signal share ᾱ_t of DDPM; γ(0) = 1, γ(1) = 0
    x0_hat    x̂0       the denoiser's prediction of x0 (model.py)
    x_self    x̃0       self-conditioning input: the previous estimate, interpolated (0 if none)
    x_cond    c        clean embeddings at context positions, 0 elsewhere
    cond_mask          True at context positions: fed clean, kept fixed, never in the loss
    length_mask        True on real tokens (text + EOS); padding is attended by nothing
    temperature τ      softmax temperature of the interpolation softmax(logits / τ) @ embeddings
    guidance    W      classifier-free guidance: x̂0 = x̂0_uncond + W (x̂0_cond - x̂0_uncond)
    gap_length         > 0 at the marker of a gap of open length: its length (data.collapse_gaps)
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model import tied_cross_entropy
from timewarp import TimeWarp
from tokenizer import SPECIAL

# Weight of the gap-length cross-entropy (averaged over the markers) in the loss. Its gradient on
# the network is larger than the denoising loss's (measured on a trained model: 2-4 against 1-3):
# at weight 1 a run lost 2 points of infilling accuracy; counted as one position of the token
# average, or at 0.2 on a tiny model, the head learnt only the typical length. README, "Gaps of
# open length".
GAP_WEIGHT = 0.5


@dataclass
class DiffusionConfig:
    schedule: str = "cosine"
    noise_scale: float = 1.0      # noise std relative to the schedule's; > 1 makes every t noisier
    self_cond_rate: float = 0.5   # share of training batches that get a self-conditioning pass
    ce_weight: float = 1.0        # loss = mse + ce_weight * ce
    skip: bool = False            # x̂0 = √γ x_t + √(1-γ) net(...): see Diffusion.denoise
    # x̂0 in the MSE: the expected embedding under the tied logits, softmax(logits) @ embeddings (the
    # sampler's interpolation at temperature 1), not the network's output itself; see Diffusion.loss.
    # Measured and not kept (EXPERIMENTS.md, "The expected embedding as x̂0").
    expected: bool = False
    # Sampling defaults, measured with evaluate.py (README, "Few steps"): 20 ancestral steps,
    # short ones at high noise, a slightly sharpened interpolation, beat 200 plain DDIM steps (the
    # fills' default); samples gain from more, fills do not (EXPERIMENTS.md, "What sample fluency
    # costs"), and from restarts (EXPERIMENTS.md, "Restarts"): 100 of them at temperature 0.9
    # (EXPERIMENTS.md, "The learning rate of the cpu preset, and 100 steps").
    sampler: str = "ddpm"         # update rule: a name in SAMPLERS
    steps: int = 100              # number of sampling steps, for samples
    infill_steps: int = 20        # the same for filling a template's gaps
    spacing: str = "restart"      # where the steps fall in t, for samples: in SPACINGS (EXPERIMENTS.md, "Restarts")
    infill_spacing: str = "quadratic"  # the same for templates (EXPERIMENTS.md, "Sampling steps where training looks")
    temperature: float = 0.9      # softmax temperature of the sampler's interpolation, for samples
    infill_temperature: float = 0.5  # the same for filling a template's gaps: a fill should be likely, samples varied
    snap: float = 0.0             # below this t, step with the likeliest token's embedding (0: never)
    # Fills drawn for each template, of which the one that agrees most with the others is kept
    # (Diffusion.sample; EXPERIMENTS.md, "Fills by consensus"). Samples take one: a consensus
    # would make them plainer.
    infill_candidates: int = 8

    def settings(self, fill: bool, steps=None, spacing=None, temperature=None, candidates=None):
        """(steps, spacing, temperature, candidates) for one use of the sampler: the given ones,
        else this config's, its infill_* ones when `fill`ing a template's gaps (one candidate
        otherwise)."""
        if fill:
            return (steps or self.infill_steps, spacing or self.infill_spacing,
                    self.infill_temperature if temperature is None else temperature,
                    candidates or self.infill_candidates)
        return (steps or self.steps, spacing or self.spacing, self.temperature if temperature is None else temperature,
                candidates or 1)


# --- noise schedules: t in [0, 1] -> γ(t), decreasing from 1 to 0 ---------------------------------

def gamma_cosine(t):
    """Nichol & Dhariwal 2021, eq. 17, without the offset: γ(t) = cos²(πt/2)."""
    return torch.cos(t * math.pi / 2).pow(2).clamp(0.0, 1.0)


def gamma_linear(t):
    """The signal share falls linearly: γ(t) = 1 - t. Noisier than cosine early, cleaner late."""
    return (1 - t).clamp(0.0, 1.0)


def gamma_sqrt(t, s=1e-4):
    """Diffusion-LM's sqrt schedule (Li et al. 2022, appendix A): γ(t) = 1 - √(t + s). The noise
    rises fast at first, so even small t hides a token; s keeps γ(0) just below 1 (0.99)."""
    return (1 - (t + s).sqrt()).clamp(0.0, 1.0)


SCHEDULES = {"cosine": gamma_cosine, "linear": gamma_linear, "sqrt": gamma_sqrt}


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


# --- step spacings: a number of steps -> the times t_0 = 1 > t_1 > ... > t_steps = 0 -------------
# (restart_spacing's times also rise, once a restart). Each takes the TimeWarp that training fitted
# (None if there is none); only the warped and restart ones read it.

def uniform_spacing(steps, warp=None):
    """Equal steps in t."""
    return torch.linspace(1, 0, steps + 1)


def quadratic_spacing(steps, warp=None):
    """t_i = 1 - (i / steps)²: short steps at high noise, where the tokens are decided, and long ones
    near t = 0, where the estimate no longer changes."""
    return 1 - torch.linspace(0, 1, steps + 1) ** 2


def sqrt_spacing(steps, warp=None):
    """t_i = 1 - √(i / steps): the opposite, short steps near t = 0."""
    return 1 - torch.linspace(0, 1, steps + 1).sqrt()


def warped_spacing(steps, warp=None):
    """The steps fall where training found the cross-entropy changing with t, the curve its
    TimeWarp fits (and where warped draws of t fall): t_i = F^-1(1 - i / steps), F the warp's
    cumulative density, so each step covers an equal share of it. The steps crowd where the tokens
    are being decided (on E2E, t = 0.75-0.95) and a few long ones cross the low noise, where nothing
    is left to decide. Without a warp (a checkpoint from before train.py kept one in every run, or
    a model it did not train), the quadratic spacing, the best one measured without it."""
    if warp is None:
        return quadratic_spacing(steps)
    ts = warp.inverse(torch.linspace(1, 0, steps + 1))
    ts[0], ts[-1] = 1.0, 0.0
    return ts


def restart_spacing(steps, warp=None):
    """A warped first pass over a fifth of the steps, then restarts of two steps each (Restart
    sampling, Xu et al. 2023): the estimate is noised afresh to the warp's median t (where the
    tokens are being decided: t = 0.87 on E2E) and denoised again, a step to the warp's lower
    quartile and one to the next restart, or to 0 after the last. Tokens decided in parallel that
    do not join get another look, now with the rest of the line nearly decided. The times rise at
    each restart, where Diffusion.sample draws x_s around the estimate instead of stepping (so the
    DDIM sampler too draws noise there). 100 steps: 20, then 40 restarts (EXPERIMENTS.md,
    "Restarts"); below 5 steps the times never rise. The last network evaluation is at the lower
    quartile: more steps below it changed nothing measurable, the tokens are decided by then."""
    restarts = steps * 2 // 5
    if restarts and steps - 2 * restarts == 2:  # a first pass of 2 would end at the median, as restarts begin
        restarts -= 1
    first = warped_spacing(steps - 2 * restarts, warp)  # (steps - 2 restarts + 1,), ends at 0
    u = torch.tensor([0.5, 0.25])  # shares of the warp's draws; without a warp, the quadratic's times
    again = (warp.inverse(u) if warp is not None else 1 - (1 - u) ** 2).repeat(restarts)  # (2 restarts,)
    return torch.cat([first[:-1], again, first[-1:]])


SPACINGS = {"uniform": uniform_spacing, "quadratic": quadratic_spacing, "sqrt": sqrt_spacing, "warped": warped_spacing,
            "restart": restart_spacing}


def get_spacing(name):
    if name not in SPACINGS:
        raise ValueError(f"unknown spacing {name!r}; choose from {', '.join(SPACINGS)}")
    return SPACINGS[name]


def consensus(candidates, mask):
    """(B, K, L) token ids of K candidate texts for each of B rows, `mask` (B, L) the positions
    that count -> (B,) the index of the candidate that agrees with the others on the most of
    them (the first such). Among the model's own samples, it is the one of highest expected token
    accuracy: minimum Bayes risk decoding (Kumar & Byrne 2004), as Diffusion-LM and DiffuSeq choose
    among their samples (with BLEU for the agreement). A token that repeats the one before it earns
    nothing: a weakly trained model's draws agree most on runs of their commonest tokens ("the the",
    ",,,"), which real text almost never has. Each candidate's agreement with itself stays in the
    sum, one point for each of its tokens that is not a repeat, so of candidates that agree with the
    others as much, the one with fewer repeats wins."""
    fresh = torch.ones_like(candidates, dtype=torch.bool)  # (B, K, L)
    fresh[..., 1:] = candidates[..., 1:] != candidates[..., :-1]
    same = (candidates[:, :, None] == candidates[:, None]) & (mask[:, None] & fresh)[:, :, None]  # (B, K, K, L)
    return same.sum((2, 3)).argmax(1)


class Diffusion:
    """Wraps a denoiser (model.Denoiser) with the forward process, the loss and the samplers."""

    def __init__(self, model, cfg: DiffusionConfig, warp: TimeWarp | None = None):
        self.model, self.cfg = model, cfg
        self.warp = warp  # training's TimeWarp, if any: where the warped and restart spacings put the steps
        self.net = model  # what the training forward calls: the model, or its DistributedDataParallel wrapper
        schedule = get_schedule(cfg.schedule)
        # Scaling the noise by s divides the signal-to-noise ratio γ/(1-γ) by s²; the endpoints stay.
        self.gamma = lambda t: (lambda g: g / (g + cfg.noise_scale ** 2 * (1 - g)))(schedule(t))
        get_sampler(cfg.sampler), get_spacing(cfg.spacing), get_spacing(cfg.infill_spacing)  # fail now, not after training

    def denoise(self, x_t, x_cond, x_self, t, length_mask, net=None):
        """x̂0 from the network. With `skip` (EDM's c_skip and c_out, Karras et al. 2022, in the
        notation of this file), the network adds only what x_t does not show: √γ x_t is already the
        best linear guess of x0 (each coordinate of x0 has unit scale), and √(1-γ) is the scale of
        what it misses. Near t = 0 the estimate is then x_t itself from the first step of training,
        and the network's errors are scaled down; near t = 1 it is the network's output, as without."""
        out = (net or self.model)(x_t, x_cond, x_self, t, length_mask)
        if not self.cfg.skip:
            return out
        gamma = self.gamma(t)[:, None, None].to(out.dtype)  # (B, 1, 1)
        return gamma.sqrt() * x_t.to(out.dtype) + (1 - gamma).sqrt() * out

    def inputs(self, ids, cond_mask):
        """Clean embeddings x0 and the context channel x_cond = x0 at context positions, else 0."""
        x0 = self.model.embeddings()[ids]  # (B, L, E)
        cond = cond_mask[..., None]  # (B, L, 1)
        return x0, torch.where(cond, x0, torch.zeros_like(x0))

    def loss(self, ids, length_mask, cond_mask, t=None, gen=None, eps=None, self_cond=None, denom=None,
             target_index=None, mse_weight=None, gap_length=None, gap_index=None, gap_denom=None):
        """MSE on x̂0 plus cross-entropy on the tied logits, both averaged over the positions to
        generate (inside the length mask, outside the context). With `expected`, x̂0 is the
        expected embedding under the logits (sure of a token, it is that token's embedding, whatever
        the norm of the network's output h), and the loss adds h's own MSE weighed by 1 - γ(t), the
        share of x0 that the noise hides; "mse" is then the expected embedding's, without that term.
        Returns a dict of scalars:
        loss (to minimise), mse, ce and acc (token accuracy on those positions), and ce_each, the (N,)
        cross-entropy of each of those positions (for the time warp).

        t (B,), eps (B, L, E) and self_cond (bool) are drawn from `gen` unless given. `denom`
        replaces the local count of positions: with data parallelism, one count for the whole
        batch makes the averaged gradient that of one big batch. `target_index`, the flat indices of
        the positions to generate, is found here if not given (on a GPU, a host-device sync).
        `mse_weight` (B,) weighs each row's MSE (TimeWarp.mse_weight). `gap_length` (B, L), where
        given, adds the cross-entropy of the gap lengths predicted at the markers (flat indices
        `gap_index`, found here if not given), averaged over them (or divided by `gap_denom`),
        weighed by GAP_WEIGHT."""
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
                first = self.denoise(x_t, x_cond, x_self, t, length_mask, self.net)
                x_self = torch.where(cond, 0.0, self.model.interpolate(first)[0])

        x0_hat = self.denoise(x_t, x_cond, x_self, t, length_mask, self.net)
        # A gap's length, read at its marker. Without markers the head still runs, on no rows, so
        # every weight has a gradient in every step (data parallelism wants that).
        gap_length = torch.zeros_like(ids) if gap_length is None else gap_length
        if gap_index is None:
            gap_index = gap_length.flatten().nonzero()[:, 0]  # (M,)
        gap_logits = self.model.gap_head(x0_hat.flatten(0, 1)[gap_index].float())  # (M, max_len)
        gap_ce = F.cross_entropy(gap_logits, gap_length.flatten()[gap_index], reduction="none")  # (M,)
        # Only the positions to generate (inside the length, outside the context) enter the loss,
        # so only they are read out: (N, E) rows, N = their count.
        if target_index is None:
            target_index = (length_mask & ~cond_mask).flatten().nonzero()[:, 0]  # (N,)
        pick = lambda x: x.flatten(0, 1)[target_index]  # noqa: E731  (B, L, ...) -> (N, ...)
        x0_hat, x0, y = pick(x0_hat).float(), pick(x0), pick(ids)  # (N, E), (N, E), (N,)
        n = max(1, len(target_index)) if denom is None else denom
        # x0_hat is the network's output h. The MSE scores h itself or, with `expected`, the
        # expected embedding under the tied logits.
        if self.cfg.expected:
            ce, pred, est = tied_cross_entropy(x0_hat, self.model.readout(), y, self.model.embeddings())
        else:
            ce, pred = tied_cross_entropy(x0_hat, self.model.readout(), y)  # (N,), (N,)
            est = x0_hat  # (N, E)
        row_weight = 1.0 if mse_weight is None else mse_weight[target_index // L]  # (N,)
        mse = ((est - x0) ** 2).mean(-1) * row_weight  # (N,)
        out = {"mse": mse.sum() / n, "ce": ce.sum() / n, "acc": (pred == y).float().sum() / n}
        out["gap_ce"] = gap_ce.sum() / (max(1, len(gap_index)) if gap_denom is None else gap_denom)
        out["loss"] = out["mse"] + self.cfg.ce_weight * out["ce"] + GAP_WEIGHT * out["gap_ce"]
        if self.cfg.expected:  # the network's own output still learns x0 where the noise hides it
            hidden = (1 - gamma[:, 0, 0])[target_index // L]  # (N,) the share of x0's variance that x_t hides
            out["loss"] = out["loss"] + (((x0_hat - x0) ** 2).mean(-1) * hidden * row_weight).sum() / n
        out["ce_each"] = ce.detach()  # (N,) per position, for the time warp; not a scalar
        return out

    @torch.no_grad()
    def gap_lengths(self, ids, length_mask, cond_mask, up_to, gen=None):
        """How many tokens each gap of open length gets: at every marker (a context position holding
        PAD, data.collapse_gaps), the median of the lengths 1 .. up_to that the model predicts there,
        from one network evaluation. up_to (B, L) is the most each gap may take, 0 but at markers. Other
        positions outside the context (gaps of fixed length) are pure noise, at t = 1."""
        x0, x_cond = self.inputs(ids, cond_mask)
        x_t = torch.where(cond_mask[..., None], x0, torch.randn(x0.shape, generator=gen, device=ids.device))
        x0_hat = self.denoise(x_t, x_cond, torch.zeros_like(x0), torch.ones(len(ids), device=ids.device), length_mask)
        p = self.model.gap_head(x0_hat.float()).softmax(-1)  # (B, L, max_len)
        n = torch.arange(p.shape[-1], device=ids.device)
        p = p * ((n >= 1) & (n <= up_to[..., None]))  # only 1 .. up_to tokens
        cdf = p.cumsum(-1) / p.sum(-1, keepdim=True).clamp(min=1e-12)
        median = (cdf < 0.5).sum(-1).clamp(min=1).minimum(up_to)  # within 1 .. up_to if all of p underflowed
        return torch.where(up_to > 0, median, 0)

    @torch.no_grad()
    def sample(self, ids, length_mask, cond_mask, steps=None, sampler=None, gen=None, on_step=None, spacing=None,
               guidance=1.0, temperature=None, snap=None, candidates=1):
        """Generate token ids by denoising from pure noise in `steps` steps.

        ids:         (B, L) tokens; only those at context positions are read
        length_mask: (B, L) True on the positions to produce (the text and its EOS)
        cond_mask:   (B, L) True where ids are given; they stay fixed at every step. Give each
                     row's EOS here: the other positions are written with text tokens only
        steps, sampler, spacing, temperature: the number of steps, names in SAMPLERS and
                     SPACINGS, and the interpolation's softmax temperature (default: the
                     config's steps, spacing and temperature, also with a context; sample.generate
                     passes the config's infill_* ones for templates)
        guidance:    classifier-free guidance weight W: x̂0 = x̂0_uncond + W (x̂0_cond - x̂0_uncond).
                     1 is the plain conditional model, 0 ignores the context, above 1 follows it
                     harder. W != 1 costs a second network evaluation a step.
        snap:        below this t, step with the embedding of the likeliest token instead of the
                     interpolation (Diffusion-LM's clamping, Li et al. 2022); default: the config's
        candidates:  draw this many texts for each row, in one batch, and return the one that
                     agrees with the others on the most generated positions (consensus); costs
                     `candidates` times the compute
        on_step:     optional callback(step, ids) with the tokens decoded at each step: B x
                     candidates rows, each row's candidates one after another
        Returns (B, L) ids: the given tokens at context positions, the model's elsewhere, PAD
        outside the length mask."""
        steps = steps or self.cfg.steps
        step_fn = get_sampler(sampler or self.cfg.sampler)
        if steps < 1:
            raise ValueError("steps must be at least 1")
        if candidates < 1:
            raise ValueError(f"candidates must be at least 1, not {candidates}")
        B, L = ids.shape
        ids, length_mask, cond_mask = (x.repeat_interleave(candidates, 0) for x in (ids, length_mask, cond_mask))
        guided = guidance != 1.0 and bool(cond_mask.any())
        temperature = self.cfg.temperature if temperature is None else temperature
        snap = self.cfg.snap if snap is None else snap
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, not {temperature}")
        x0_ctx, x_cond = self.inputs(ids, cond_mask)
        cond = cond_mask[..., None]
        x_t = torch.randn(x0_ctx.shape, generator=gen, device=ids.device)  # x_1 ~ N(0, I)
        x_self = x_self_uncond = torch.zeros_like(x_t)
        ts = get_spacing(spacing or self.cfg.spacing)(steps, self.warp)  # (steps + 1,)
        restart = (ts[1:] > ts[:-1]).tolist()  # where the times rise (restart_spacing), read once on the host
        ts = ts.to(ids.device)
        for i in range(steps):
            t, s = ts[i], ts[i + 1]
            x_in = torch.where(cond, x0_ctx, x_t)
            if guided:
                # Classifier-free guidance (Ho & Salimans 2022): the same network with the context
                # and without it (it learnt both: training drops all context from some rows), in
                # one batch of 2B rows. The unconditional half sees noise at context positions, as
                # its training rows did, and its own self-conditioning estimate everywhere.
                both = self.denoise(torch.cat([x_in, x_t]), torch.cat([x_cond, torch.zeros_like(x_cond)]),
                                  torch.cat([x_self, x_self_uncond]), t.expand(2 * len(ids)), length_mask.repeat(2, 1))
                x0_cond, x0_uncond = both.float().chunk(2)  # 2 x (B, L, E)
                # at context positions the conditional output was never trained (no loss there):
                # x_t there, which only the unconditional half reads, follows the unconditional estimate
                x0_hat = torch.where(cond, x0_uncond, x0_uncond + guidance * (x0_cond - x0_uncond))
            else:
                x0_hat = self.denoise(x_in, x_cond, x_self, t.expand(len(ids)), length_mask)
            # Step with the interpolated estimate: it lies among the token embeddings, where x0 lives.
            # Every position it writes holds a text token (a row's EOS is given), so padding, EOS,
            # BOS and UNK get no probability there: an UNK would print as "⁇", an EOS would cut the
            # text short. (At context positions only guidance's unconditional half reads x̂0.)
            x0_hat, best = self.model.interpolate(x0_hat, temperature, banned=SPECIAL, at=~cond_mask)
            if s < snap:  # step with the likeliest token's own embedding
                x0_hat = self.model.embeddings()[best]
            x_self, x_self_uncond = torch.where(cond, 0.0, x0_hat), x0_hat
            if restart[i]:  # x_s drawn afresh from q(x_s | x̂0), around the estimate
                noise = torch.randn(x_t.shape, generator=gen, device=x_t.device, dtype=x_t.dtype)
                x_t = self.gamma(s).sqrt() * x0_hat + (1 - self.gamma(s)).sqrt() * noise
            else:
                x_t = step_fn(x_t, x0_hat, self.gamma(t), self.gamma(s), gen)
            tokens = torch.where(cond_mask, ids, best)
            tokens = torch.where(length_mask, tokens, 0)
            if on_step is not None:
                on_step(i, tokens)
        tokens = tokens.view(B, candidates, L)  # each row's candidates, one after another
        return tokens[torch.arange(B, device=ids.device), consensus(tokens, (length_mask & ~cond_mask)[::candidates])]
