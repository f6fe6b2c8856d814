"""Train a diffusion language model on a corpus of one example a line.

    python train.py --corpus data/corpus.txt --out runs/demo --preset small --max-minutes 10

A tokenizer is trained into OUT/tokenizer.model unless --tokenizer names one. Rerunning with the same
--out resumes from OUT/ckpt.pt. Ctrl-C (or SIGTERM) saves a checkpoint and stops; a second Ctrl-C
stops at once.
"""
import argparse
import contextlib
import inspect
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import checkpoint
from data import Batches, Corpus, UserError, die_of, mask_mixture, read_lines, run, seed_arg, split_valid, stdout_may_close, threads_arg
from device import PRECISIONS, all_sum, autocast, check_in_sync, set_threads, setup_distributed, use_bf16
from diffusion import SAMPLERS, SCHEDULES, Diffusion, DiffusionConfig
from model import BACKBONES, PRESETS, build_model, get_preset
from sample import generate
from timewarp import TIME_DRAWS, TimeWarp
from tokenizer import Tokenizer, train_tokenizer


@dataclass
class TrainConfig:
    corpus: str = ""
    valid: str = ""            # held-out file; if empty, a fixed-seed share of the corpus is held out
    tokenizer: str = ""
    vocab_size: int = 4000
    out: str = "runs/default"
    preset: str = "small"
    max_len: int = 0           # 0: the preset's
    batch_size: int = 64       # lines per optimizer step, over all processes and accumulation steps
    grad_accum: int = 1
    lr: float = 0.0            # peak learning rate; 0: a resumed run's own, else the preset's (PEAK_LR)
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    max_steps: int = 0         # 0: no step limit
    max_minutes: float = 0.0   # 0: no time limit
    stop_at_step: int = 0      # save and stop here without changing the schedule (0: never)
    keep: int = 1              # checkpoints kept: ckpt.pt and the keep-1 before it
    check_sync: bool = False
    eval_every: int = 500
    log_every: int = 10
    noise_scale: float = 1.0
    backbone: str = "estimator"
    schedule: str = "cosine"
    sampler: str = "ddpm"      # the checkpoint's default sampler
    uncond_rate: float = 0.3   # share of rows trained with no context (unconditional; guidance needs it)
    time_draw: str = "warped"  # how t is drawn for each row: uniform, stratified or warped (TimeWarp)
    warp_floor: float = 0.2    # share of the warped draws that stay uniform
    self_cond_rate: float = 0.5
    mse_reweight: bool = True  # with warped t, give the MSE at every t at least its uniform share
    skip: bool = False         # the network predicts what x_t misses of x0 (Diffusion.denoise)
    expected: bool = False     # x̂0 is the expected embedding under the tied logits (Diffusion.loss)
    embed_dim: int = 0         # 0: the preset's
    open_rate: float = 0.1     # share of rows that teach the lengths of gaps of open length ([gap:..N])
    ema: float = 0.0           # decay of a moving average of the weights for sampling (0: none)
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    precision: str = "auto"    # auto, fp32 or bf16 (autocast); see use_bf16
    compile: bool = False      # torch.compile the network


# The peak learning rate of a preset, where it is not 1e-3: smaller networks take higher ones (GPT-3's
# table gives one per size). The `cpu` preset's: EXPERIMENTS.md, "The learning rate of the cpu
# preset, and 100 steps".
PEAK_LR = {"cpu": 2e-3}


def lr_at(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr. `progress` in [0, 1] is how much of
    the budget is spent: steps or minutes, whichever runs out first. Decaying by the real budget
    matters for short runs: a schedule tuned for 100k steps never leaves its warm-up in 10 minutes."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup))
    decay = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * warm * decay


@torch.no_grad()
def validate(diffusion: Diffusion, corpus: Corpus, device, batch_size=64, max_batches=20, rank=0, world=1, bf16=False) -> dict:
    """Loss parts on held-out lines, with the noise, t and masks drawn from a fixed seed per batch.
    With several processes each takes every world-th batch and the sums are reduced."""
    order = torch.argsort(corpus.lengths).tolist()[: batch_size * max_batches]
    starts = list(range(0, len(order), batch_size))
    sums = torch.zeros(5)  # loss, mse, ce, acc weighted by positions; positions
    for i in starts[rank::world]:
        b = {k: v.to(device) for k, v in corpus.batch(order[i: i + batch_size], torch.Generator().manual_seed(i)).items()}
        gen = torch.Generator(device=device).manual_seed(1234 + i)
        n = (b["length_mask"] & ~b["cond_mask"]).sum().item()
        with autocast(device, bf16):
            parts = diffusion.loss(b["ids"], b["length_mask"], b["cond_mask"], gen=gen)
        sums += torch.tensor([parts[k].item() * n for k in ("loss", "mse", "ce", "acc")] + [n])
    sums = all_sum(sums, world)
    return {k: (sums[j] / sums[4].clamp(min=1)).item() for j, k in enumerate(("loss", "mse", "ce", "acc"))}


def train(cfg: TrainConfig, quiet: bool = False) -> dict:
    """Train (or resume) as `cfg` says. Returns the last logged numbers; after Ctrl-C (or SIGTERM,
    or a closed terminal) it saves, then raises checkpoint.Stopped (in one process; under torchrun
    it returns).

    Every random draw of step k (t, noise, self-conditioning) comes from a generator seeded with
    (seed, k), and the batches from a resumable order: a resumed run, and a run split over
    several processes, compute what one uninterrupted process would."""
    torch.manual_seed(cfg.seed)
    set_threads(cfg.threads)
    rank, world, device = setup_distributed(cfg.device)
    silent = quiet  # the same on every process: skip validation too
    quiet = quiet or rank != 0
    if cfg.batch_size % (world * cfg.grad_accum):
        raise UserError(f"--batch-size {cfg.batch_size} must split evenly over {world} processes x {cfg.grad_accum} accumulation steps")
    lines = read_lines(cfg.corpus)  # first: a mistake here leaves no empty --out folder behind
    if cfg.valid:
        train_lines, valid_lines = lines, read_lines(cfg.valid)
        if os.path.samefile(cfg.valid, cfg.corpus) and not quiet:
            print("note: --valid is --corpus: the validation numbers are on lines trained on", file=sys.stderr)
    else:
        train_lines, valid_lines = split_valid(lines, seed=cfg.seed)

    if rank == 0:
        checkpoint.check_writable(cfg.out, 0)
        for f in os.listdir(cfg.out):  # left by a process killed while writing a checkpoint
            if f.startswith(".ckpt-") and f.endswith(".tmp"):
                os.remove(os.path.join(cfg.out, f))
    ckpt_path = os.path.join(cfg.out, "ckpt.pt")
    resume = checkpoint.load(ckpt_path) if os.path.exists(ckpt_path) else None
    # no --lr: a resumed run keeps its own, a new one takes its preset's
    cfg = replace(cfg, lr=cfg.lr or (resume or {}).get("train_config", {}).get("lr") or PEAK_LR.get(cfg.preset, 1e-3))

    if resume is not None:
        checkpoint.check_resume(resume, ckpt_path, asdict(cfg))
        tok, model, diffusion = checkpoint.build(resume, device, ema=False)  # train on the trained weights
        if cfg.tokenizer and load_tokenizer(cfg.tokenizer).model_bytes != tok.model_bytes:
            raise UserError(f"{ckpt_path} was trained with another tokenizer than {cfg.tokenizer}; use another --out")
        mcfg, dcfg = model.cfg, diffusion.cfg
    else:
        tok = load_or_train_tokenizer(cfg, train_lines, rank, world)
        mcfg = get_preset(cfg.preset)
        mcfg.vocab_size = tok.vocab_size
        if cfg.max_len:
            mcfg.max_len = cfg.max_len
        if cfg.embed_dim:
            mcfg.embed_dim = cfg.embed_dim
        mcfg.backbone = cfg.backbone
        dcfg = DiffusionConfig(noise_scale=cfg.noise_scale, schedule=cfg.schedule, sampler=cfg.sampler,
                               self_cond_rate=cfg.self_cond_rate, skip=cfg.skip, expected=cfg.expected)
        try:
            model = build_model(mcfg).to(device)
        except ValueError as e:
            raise UserError(f"--backbone: {e}") from None
        diffusion = Diffusion(model, dcfg)
    model.train()
    if world > 1:
        # averages gradients over the processes in backward; the buffers are constants, and
        # broadcasting them would make every forward (validation too) a collective step (torch 2.13
        # renamed the switch; the old name still works there, with a warning)
        renamed = "forward_sync_buffers" in inspect.signature(DDP).parameters
        diffusion.net = DDP(model, **{"forward_sync_buffers" if renamed else "broadcast_buffers": False})
    if cfg.compile:
        diffusion.net = torch.compile(diffusion.net)  # compiles on the first steps; see README, "Speed"
    bf16 = use_bf16(device, cfg.precision)

    corpus = Corpus(train_lines, tok, mcfg.max_len)
    valid = Corpus(valid_lines, tok, mcfg.max_len) if valid_lines else None
    if resume is not None and resume.get("length_hist", corpus.length_histogram()) != corpus.length_histogram():
        # the saved data position counts lines of the corpus it was trained on
        raise UserError(f"{ckpt_path} was trained on other lines than --corpus {cfg.corpus} gives now "
                        f"(their lengths differ); resume with that corpus, or start a new run in another --out")
    if not quiet:
        if not valid_lines:
            print(f"note: {len(lines)} lines are too few to hold 5% out: no validation numbers (give --valid)",
                  file=sys.stderr)
        if resume is None and not cfg.tokenizer and tok.vocab_size < cfg.vocab_size:
            print(f"note: the tokenizer has {tok.vocab_size} pieces, not --vocab-size {cfg.vocab_size}: "
                  f"the corpus is too small for more", file=sys.stderr)
    if rank == 0:
        corpus.notes(hint="; --max-len sets the model's length" if resume is None else "")
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if rank == 0:
        checkpoint.check_writable(cfg.out, n_params * 4 * 3 * (1 + cfg.keep))

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]  # no weight decay on biases and scalars
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.99))
    batches = Batches(corpus, cfg.batch_size, seed=cfg.seed, mixture=mask_mixture(cfg.uncond_rate), open_rate=cfg.open_rate)
    # where the loss changes with t: warped draws follow it, and so do the warped and restart steps,
    # whatever the draws, so every run keeps it
    warp = diffusion.warp = TimeWarp(floor=cfg.warp_floor)
    step, elapsed_before = 0, 0.0
    # An exponential moving average of the weights (float32, buffers copied): what samples are drawn with
    ema = {k: v.detach().float().clone() for k, v in model.state_dict().items()} if cfg.ema else None
    if resume is not None:
        if ema is not None and "ema" in resume:
            ema = {k: v.to(device) for k, v in resume["ema"].items()}
        if "time_warp" in resume:
            warp.loss = resume["time_warp"].clone()
        opt.load_state_dict(resume["optimizer"])
        batches.load_state(resume["batches"])
        step, elapsed_before = resume["step"], resume["elapsed"]

    resolved = {"train": asdict(cfg), **checkpoint.configs(mcfg, dcfg)}
    if rank == 0:
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(resolved, f, indent=2)
    if not quiet:
        print(json.dumps(resolved))
        print(f"{n_params / 1e6:.2f} M parameters, {len(corpus)} training lines"
              f"{f', {len(valid)} held-out' if valid else ''}, device {device}, {world} process(es), "
              f"{torch.get_num_threads()} threads, {'bf16 autocast' if bf16 else 'float32'}{', resuming at step ' + str(step) if resume else ''}")

    def diverged():
        kept = f"the last good checkpoint stays in {ckpt_path}" if os.path.exists(ckpt_path) else "no checkpoint was saved"
        return UserError(f"the loss diverged (not finite) by step {step}; stopped: {kept}. Try a lower --lr")

    def save():
        # weights that are no longer finite never replace a good checkpoint (every process checks,
        # so all of them stop together)
        if not all(torch.isfinite(p).all() for p in params):
            bar.close()
            raise diverged()
        if rank == 0:
            checkpoint.save(ckpt_path, keep=cfg.keep, model=model.state_dict(), optimizer=opt.state_dict(), step=step,
                            elapsed=elapsed_before + time.time() - start, batches=batches.state(),
                            rng={"cpu": torch.get_rng_state()}, tokenizer=tok.model_bytes,
                            length_hist=corpus.length_histogram(), train_config={**asdict(cfg), "corpus": os.path.abspath(cfg.corpus)},  # found from any folder
                            **({"ema": ema} if ema is not None else {}),
                            time_warp=warp.loss,
                            **checkpoint.configs(mcfg, dcfg))

    def progress():
        p = 0.0
        if cfg.max_steps:
            p = max(p, step / cfg.max_steps)
        if cfg.max_minutes:
            p = max(p, (elapsed_before + time.time() - start) / (60 * cfg.max_minutes))
        return p

    def stdout_closed():  # its reader went away: save and stop, as on Ctrl-C
        stopper.stop = True
        with contextlib.suppress(OSError):
            print(f"stdout was closed: stopping at step {step}, saving a checkpoint", file=sys.stderr)

    stopper = checkpoint.StopFlag()
    start = time.time()
    bar = tqdm(total=cfg.max_steps or None, initial=step, disable=quiet, dynamic_ncols=True, mininterval=1, file=sys.stdout)
    logged, sums, summed, tokens, t_log = {}, {}, 0, 0, time.time()
    it = iter(batches)
    while True:
        # all processes agree on when to stop (rank 0's clock, anyone's Ctrl-C)
        state = all_sum(torch.tensor([progress() if rank == 0 else 0.0, float(stopper.stop)]), world)
        p, stop = state[0].item(), state[1].item() > 0
        if p >= 1 or stop or (cfg.stop_at_step and step >= cfg.stop_at_step):
            break
        lr = lr_at(cfg, step, p)
        for g in opt.param_groups:
            g["lr"] = lr
        parts = train_step(diffusion, next(it), cfg, step, rank, world, device, bf16, warp)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            update_ema(ema, model, min(cfg.ema, (1 + step) / (10 + step)))
        step += 1
        if cfg.check_sync and world > 1:
            check_in_sync(params, world)
        tokens += parts.pop("tokens")
        summed += 1  # steps in `sums`: fewer than --log-every in the first log after a resume
        for k, v in parts.items():  # summed on the device: no host sync every step
            sums[k] = sums.get(k, 0) + v.detach()

        with stdout_may_close(stdout_closed):  # `train.py | head`; it writes after the collectives, so all agree
            if step % cfg.log_every == 0:
                keys = sorted(sums)
                total = all_sum(torch.stack([sums[k].float().cpu() for k in keys]), world)
                logged = {k: v.item() / summed for k, v in zip(keys, total)}
                if not math.isfinite(logged["loss"]):
                    bar.close()
                    raise diverged()
                tok_s = world * tokens / (time.time() - t_log)
                bar.set_postfix(loss=f"{logged['loss']:.3f}", mse=f"{logged['mse']:.3f}", ce=f"{logged['ce']:.3f}",
                                acc=f"{logged['acc']:.3f}", **({"gap_ce": f"{logged['gap_ce']:.2f}"} if cfg.open_rate else {}),
                                tok_s=f"{tok_s:.0f}", lr=f"{lr:.1e}")
                logged["tokens_per_s"] = tok_s
                sums, summed, tokens, t_log = {}, 0, 0, time.time()
            bar.update(1)

        if step % cfg.eval_every == 0:
            save()  # first: nothing that goes wrong while reporting may cost the checkpoint
            with stdout_may_close(stdout_closed):  # rank 0 writes after report's collectives
                report(diffusion, tok, corpus, valid, device, step, silent, rank, world, bf16)
            t_log, tokens = time.time(), 0  # evaluation time is not training time
    stopper.release()
    save()  # first: what follows writes to stdout, whose reader may have gone
    with stdout_may_close():
        bar.close()
    with stdout_may_close():
        report(diffusion, tok, corpus, valid, device, step, silent, rank, world, bf16)
        if not quiet:
            print(f"saved {ckpt_path} at step {step}" + ("; the same command resumes it" if stopper.stop else ""))
    if world > 1:
        dist.destroy_process_group()
    # Saved; the caller decides what the signal ends (train.py: the process, as it would have). Not under
    # torchrun, which reports the signals it got itself: a worker that dies of one counts as failed there
    # (and, where the signal reached that worker alone, is restarted with --max-restarts).
    if stopper.signum and world == 1:
        raise checkpoint.Stopped(stopper.signum)
    return logged


def train_step(diffusion, batch, cfg, step, rank, world, device, bf16, warp) -> dict:
    """Forward and backward for one global batch, of which this process takes every world-th row,
    in cfg.grad_accum pieces. The noise is drawn for the whole batch from (seed, step), then sliced,
    so each row gets the same noise whatever the number of processes. t is drawn as cfg.time_draw
    says, and the cross-entropy of each bin of t, summed over all processes, updates the TimeWarp."""
    ids, length_mask, cond_mask = batch["ids"], batch["length_mask"], batch["cond_mask"]
    gap_length = batch.get("gap_length", torch.zeros_like(ids))  # > 0 at the markers of open gaps
    B, L = ids.shape
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    # (B,): independent uniform draws, or stratified ones, warped or not
    warped = cfg.time_draw == "warped"
    t = torch.rand(B, generator=g) if cfg.time_draw == "uniform" else warp.draw(B, g, warped=warped)
    w = warp.mse_weight(t) if warped and cfg.mse_reweight else None  # (B,) or None
    eps = torch.randn(B, L, diffusion.model.cfg.embed_dim, generator=g)  # (B, L, E)
    self_cond = torch.rand((), generator=g).item() < diffusion.cfg.self_cond_rate
    # the average over all target positions of the global batch, whatever the split
    denom = (length_mask & ~cond_mask).sum().clamp(min=1).float() / world
    gap_denom = (gap_length > 0).sum().clamp(min=1).float() / world
    rows = torch.arange(B)[rank::world].chunk(cfg.grad_accum)
    sums, warp_sums = {}, 0
    for i, r in enumerate(rows):
        last = i == len(rows) - 1
        sync = contextlib.nullcontext() if last or world == 1 else diffusion.net.no_sync()
        with sync:
            # the positions in the loss, found on the CPU: on a GPU that would be a host sync
            target_index = (length_mask[r] & ~cond_mask[r]).flatten().nonzero()[:, 0]
            gap_index = gap_length[r].flatten().nonzero()[:, 0]
            with autocast(device, bf16):
                parts = diffusion.loss(ids[r].to(device), length_mask[r].to(device), cond_mask[r].to(device),
                                       t=t[r].to(device), eps=eps[r].to(device), self_cond=self_cond,
                                       denom=denom.to(device), target_index=target_index.to(device),
                                       mse_weight=None if w is None else w[r].to(device),
                                       gap_length=gap_length[r].to(device), gap_index=gap_index.to(device),
                                       gap_denom=gap_denom.to(device))
            parts["loss"].backward()
        ce_each = parts.pop("ce_each")
        # each position's cross-entropy goes to the bin of its row's t, on the device
        warp_sums = warp_sums + warp.tally(t[r], target_index.to(device) // L, ce_each)
        for k, v in parts.items():
            sums[k] = sums.get(k, 0) + v.detach()
    warp.update(*all_sum(warp_sums.cpu(), world))  # one transfer a step
    sums["tokens"] = int(length_mask[torch.arange(B)[rank::world]].sum())
    return sums


@torch.no_grad()
def update_ema(ema: dict, model, decay: float):
    """ema <- decay * ema + (1 - decay) * weights. The decay starts low ((1 + step) / (10 + step)),
    so the average does not drag the random initialisation through a short run."""
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            ema[k].lerp_(v.float(), 1 - decay)
        else:
            ema[k].copy_(v)


def load_or_train_tokenizer(cfg, train_lines, rank, world):
    """--tokenizer, or one trained here by rank 0 into OUT/tokenizer.model (the others wait)."""
    path = cfg.tokenizer or os.path.join(cfg.out, "tokenizer.model")
    if not cfg.tokenizer and rank == 0:
        try:
            train_tokenizer(train_lines, cfg.vocab_size, path[: -len(".model")])
        except ValueError as e:
            raise UserError(str(e)) from None
    if world > 1:
        dist.barrier()
    return load_tokenizer(path)


def load_tokenizer(path):
    try:
        return Tokenizer.load(path)
    except OSError as e:
        raise UserError(f"--tokenizer {path}: {e.strerror}") from None
    except ValueError as e:
        raise UserError(f"--tokenizer {path}: {e}") from None


def report(diffusion, tok, corpus, valid, device, step, silent, rank=0, world=1, bf16=False):
    """Validation numbers (reduced over the processes) and, on rank 0, a few unconditional samples."""
    if silent:
        return
    if valid is not None:
        v = validate(diffusion, valid, device, rank=rank, world=world, bf16=bf16)
        if rank == 0:
            tqdm.write(f"step {step}: valid loss {v['loss']:.3f} mse {v['mse']:.3f} ce {v['ce']:.3f} acc {v['acc']:.3f}")
    if rank != 0:
        return
    for text in generate(diffusion, tok, num_samples=3, lengths_from=corpus.length_histogram(), seed=step):
        tqdm.write(f"  sample: {text}")


def parse_args(argv=None) -> TrainConfig:
    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: sys.exit(f"error: {message}")  # one line, no usage dump
    p.add_argument("--corpus", required=True, help="training text, UTF-8, one example a line")
    p.add_argument("--valid", default=d.valid, help="held-out text; default: hold out 5%% of --corpus (fixed seed, at most 1000 lines)")
    p.add_argument("--tokenizer", default=d.tokenizer, help="a .model file from tokenizer.py; default: train one into OUT/tokenizer.model")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size, help="vocabulary size when the tokenizer is trained here")
    p.add_argument("--out", default=d.out, help="folder for ckpt.pt and config.json; an existing ckpt.pt there is resumed")
    p.add_argument("--preset", default=d.preset, choices=sorted(PRESETS), help="model size, see model.py")
    p.add_argument("--max-len", type=int, default=d.max_len, help="longest text in tokens, EOS included (0: the preset's)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="lines per step")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="split each batch into this many sequential pieces (less memory, same result)")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default or 0: a resumed run's "
                   "own, else the preset's: 2e-3 for cpu, 1e-3 for the others)")
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="final learning rate as a share of --lr")
    p.add_argument("--warmup", type=int, default=d.warmup, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay on matrices")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="clip the gradient norm to this")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help="stop after this many steps in all (0: no limit)")
    p.add_argument("--max-minutes", type=float, default=d.max_minutes, help="stop after this many minutes of training in all (0: no limit)")
    p.add_argument("--stop-at-step", type=int, default=d.stop_at_step, help="save and stop at this step; the schedule still follows --max-steps/--max-minutes, so a rerun continues it")
    p.add_argument("--keep", type=int, default=d.keep, help="keep this many checkpoints: OUT/ckpt.pt and OUT/ckpt-STEP.pt before it")
    p.add_argument("--check-sync", action="store_true", help="under torchrun, check after every step that all processes hold the same parameters")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="validate, print samples and save every N steps")
    p.add_argument("--log-every", type=int, default=d.log_every, help="update the progress bar every N steps")
    p.add_argument("--noise-scale", type=float, default=d.noise_scale, help="noise std relative to the cosine schedule's (SNR / scale^2)")
    p.add_argument("--backbone", default=d.backbone, help=f"denoiser network, a name in model.BACKBONES ({', '.join(BACKBONES)})")
    p.add_argument("--schedule", default=d.schedule, choices=sorted(SCHEDULES), help="noise schedule γ(t), see diffusion.py")
    p.add_argument("--sampler", default=d.sampler, choices=sorted(SAMPLERS), help="the checkpoint's default sampler")
    p.add_argument("--uncond-rate", type=float, default=d.uncond_rate, help="share of training rows given no context: they teach the unconditional model that --guidance needs")
    p.add_argument("--time-draw", default=d.time_draw, choices=TIME_DRAWS,
                   help="how t is drawn: uniform (independent), stratified (evenly spread over each batch), warped (CDCD: where the loss changes)")
    p.add_argument("--warp-floor", type=float, default=d.warp_floor, help="share of uniform draws mixed into the warped ones")
    p.add_argument("--self-cond-rate", type=float, default=d.self_cond_rate, help="share of batches trained with a self-conditioning pass")
    p.add_argument("--no-mse-reweight", dest="mse_reweight", action="store_false",
                   help="with warped t, let the MSE follow the warp too (see TimeWarp.mse_weight)")
    p.add_argument("--skip", action="store_true", help="the network predicts what x_t misses of x0, not x0 (see Diffusion.denoise)")
    p.add_argument("--expected", action="store_true",
                   help="x̂0 is the expected embedding under the tied logits, not the network's output (see Diffusion.loss)")
    p.add_argument("--embed-dim", type=int, default=d.embed_dim, help="width E of the token embeddings the diffusion runs in (0: the preset's)")
    p.add_argument("--open-rate", type=float, default=d.open_rate,
                   help="share of rows that teach how long a hidden span is, from the words around it: [gap:..N] needs it")
    p.add_argument("--ema", type=float, default=d.ema, help="decay of the weights' moving average that samples use (0: none)")
    p.add_argument("--seed", type=seed_arg, default=d.seed, help="seed for initialisation, data order and noise")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda or mps")
    p.add_argument("--threads", type=threads_arg, default=d.threads, help="torch CPU threads (0: one per core)")
    p.add_argument("--precision", default=d.precision, choices=PRECISIONS,
                   help="bf16 autocast or float32; auto: bf16 on CUDA and on CPUs where it measures faster")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (pays on GPUs; see README)")
    a = p.parse_args(argv)
    cfg = TrainConfig(**{k.replace("-", "_"): v for k, v in vars(a).items()})
    for name in ("batch_size", "eval_every", "log_every", "vocab_size", "grad_accum", "keep"):
        if getattr(cfg, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("max_steps", "max_minutes", "warmup", "max_len", "weight_decay", "stop_at_step", "embed_dim"):
        if getattr(cfg, name) < 0:
            p.error(f"--{name.replace('_', '-')} must not be negative")
    if not 0 <= cfg.uncond_rate <= 1:
        p.error("--uncond-rate must be between 0 and 1")
    if not all(0 <= x <= 1 for x in (cfg.self_cond_rate, cfg.open_rate, cfg.warp_floor)):
        p.error("--self-cond-rate, --open-rate and --warp-floor must be between 0 and 1")
    if not 0 <= cfg.ema < 1:
        p.error("--ema must be at least 0 and below 1")
    if not all(0 < x < math.inf for x in (cfg.lr or 1, cfg.grad_clip, cfg.noise_scale)):  # --lr 0: the default
        p.error("--lr, --grad-clip and --noise-scale must be positive and finite")
    if not 0 <= cfg.min_lr_ratio <= 1:
        p.error("--min-lr-ratio must be between 0 and 1")
    if not math.isfinite(cfg.max_minutes) or not math.isfinite(cfg.weight_decay):
        p.error("--max-minutes and --weight-decay must be finite")
    if cfg.max_len == 1 or cfg.max_len > 4096:
        p.error("--max-len must be between 2 and 4096")
    if not cfg.max_steps and not cfg.max_minutes:
        p.error("give --max-steps or --max-minutes (or both)")
    return cfg


def main():
    cfg = parse_args()
    try:
        train(cfg)
    except UserError as e:
        sys.exit(f"error: {e}")
    except checkpoint.Stopped as e:
        die_of(e.signum)


if __name__ == "__main__":
    run(main)
