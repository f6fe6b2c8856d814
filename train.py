"""Train a diffusion language model on a corpus of one example a line.

    python train.py --corpus data/corpus.txt --out runs/demo --preset small --max-minutes 10

A tokenizer is trained into OUT/tokenizer.model unless --tokenizer names one. Rerunning with the same
--out resumes from OUT/ckpt.pt. Ctrl-C (or SIGTERM) saves a checkpoint and stops; a second Ctrl-C
stops at once.
"""
import argparse
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

import checkpoint
from data import Batches, Corpus, UserError, read_lines, split_valid
from diffusion import Diffusion, DiffusionConfig
from model import Estimator, PRESETS, get_preset
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
    batch_size: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    max_steps: int = 0         # 0: no step limit
    max_minutes: float = 0.0   # 0: no time limit
    eval_every: int = 500
    log_every: int = 10
    noise_scale: float = 1.0
    seed: int = 0
    device: str = "auto"
    threads: int = 0


def lr_at(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr. `progress` in [0, 1] is how much of
    the budget is spent: steps or minutes, whichever runs out first. Decaying by the real budget
    matters for short runs: a schedule tuned for 100k steps never leaves its warm-up in 10 minutes."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup))
    decay = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * warm * decay


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@torch.no_grad()
def validate(diffusion: Diffusion, corpus: Corpus, device, batch_size=64, max_batches=20) -> dict:
    """Loss parts on held-out lines, with the noise, t and masks drawn from a fixed seed."""
    gen = torch.Generator(device=device).manual_seed(1234)
    mask_gen = torch.Generator().manual_seed(1234)
    order = torch.argsort(corpus.lengths).tolist()
    sums, count = {}, 0
    for i in range(0, min(len(order), batch_size * max_batches), batch_size):
        b = {k: v.to(device) for k, v in corpus.batch(order[i: i + batch_size], mask_gen).items()}
        with autocast(device):
            parts = diffusion.loss(b["ids"], b["length_mask"], b["cond_mask"], gen=gen)
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v.item()
        count += 1
    return {k: v / count for k, v in sums.items()}


def autocast(device):
    """bf16 autocast on CUDA; full precision elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def check_writable(out: str, need_bytes: int):
    """Fail before training, not after an hour of it, if checkpoints cannot be written."""
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, ".write-test")
        with open(probe, "wb") as f:
            f.write(b"0")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"--out {out}: cannot write there ({e.strerror})") from None
    free = shutil.disk_usage(out).free
    if free < 2 * need_bytes:
        raise UserError(f"--out {out}: {free / 2**20:.0f} MiB free, a checkpoint needs about {need_bytes / 2**20:.0f} MiB (twice that while writing)")


class StopFlag:
    """First SIGINT/SIGTERM: finish the step, save, exit. Second: exit at once."""

    def __init__(self):
        self.stop = False
        signal.signal(signal.SIGINT, self.handle)
        signal.signal(signal.SIGTERM, self.handle)

    def handle(self, signum, frame):
        if self.stop:
            os._exit(130)
        self.stop = True
        tqdm.write("stopping: saving a checkpoint (Ctrl-C again to quit at once)", file=sys.stderr)


def train(cfg: TrainConfig, quiet: bool = False) -> dict:
    """Train (or resume) as `cfg` says. Returns the last logged numbers."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    device = pick_device(cfg.device)
    check_writable(cfg.out, 0)
    ckpt_path = os.path.join(cfg.out, "ckpt.pt")
    resume = checkpoint.load(ckpt_path) if os.path.exists(ckpt_path) else None

    lines = read_lines(cfg.corpus)
    if cfg.valid:
        train_lines, valid_lines = lines, read_lines(cfg.valid)
    else:
        train_lines, valid_lines = split_valid(lines, seed=cfg.seed)

    if resume is not None:
        tok, model, diffusion = checkpoint.build(resume, device)
        if cfg.tokenizer and Tokenizer.load(cfg.tokenizer).model_bytes != tok.model_bytes:
            raise UserError(f"{ckpt_path} was trained with another tokenizer than {cfg.tokenizer}; use another --out")
        mcfg, dcfg = model.cfg, diffusion.cfg
    else:
        if cfg.tokenizer:
            try:
                tok = Tokenizer.load(cfg.tokenizer)
            except OSError as e:
                raise UserError(f"--tokenizer {cfg.tokenizer}: {e.strerror}") from None
            except ValueError as e:
                raise UserError(f"--tokenizer {cfg.tokenizer}: {e}") from None
        else:
            try:
                tok = train_tokenizer(train_lines, cfg.vocab_size, os.path.join(cfg.out, "tokenizer"))
            except ValueError as e:
                raise UserError(str(e)) from None
        mcfg = get_preset(cfg.preset)
        mcfg.vocab_size = tok.vocab_size
        if cfg.max_len:
            mcfg.max_len = cfg.max_len
        dcfg = DiffusionConfig(noise_scale=cfg.noise_scale)
        model = Estimator(mcfg).to(device)
        diffusion = Diffusion(model, dcfg)
    model.train()

    corpus = Corpus(train_lines, tok, mcfg.max_len)
    valid = Corpus(valid_lines, tok, mcfg.max_len) if valid_lines else None
    if corpus.cropped:
        print(f"note: {corpus.cropped} of {len(corpus)} lines were longer than {mcfg.max_len - 1} tokens and were cropped", file=sys.stderr)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    check_writable(cfg.out, n_params * 4 * 3)

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]  # no weight decay on biases and scalars
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.99))
    batches = Batches(corpus, cfg.batch_size, seed=cfg.seed)
    step, elapsed_before = 0, 0.0
    if resume is not None:
        opt.load_state_dict(resume["optimizer"])
        batches.load_state(resume["batches"])
        step, elapsed_before = resume["step"], resume["elapsed"]
        torch.set_rng_state(resume["rng"]["cpu"])
        if device.type == "cuda" and "cuda" in resume["rng"]:
            torch.cuda.set_rng_state(resume["rng"]["cuda"])

    resolved = {"train": asdict(cfg), **checkpoint.configs(mcfg, dcfg)}
    with open(os.path.join(cfg.out, "config.json"), "w") as f:
        json.dump(resolved, f, indent=2)
    if not quiet:
        print(json.dumps(resolved))
        print(f"{n_params / 1e6:.2f} M parameters, {len(corpus)} training lines"
              f"{f', {len(valid)} held-out' if valid else ''}, device {device}, {torch.get_num_threads()} threads"
              f"{', resuming at step ' + str(step) if resume else ''}")

    def save():
        rng = {"cpu": torch.get_rng_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state()
        checkpoint.save(ckpt_path, model=model.state_dict(), optimizer=opt.state_dict(), step=step,
                        elapsed=elapsed_before + time.time() - start, batches=batches.state(), rng=rng,
                        tokenizer=tok.model_bytes, length_hist=corpus.length_histogram(),
                        train_config=asdict(cfg), **checkpoint.configs(mcfg, dcfg))

    def progress():
        p = 0.0
        if cfg.max_steps:
            p = max(p, step / cfg.max_steps)
        if cfg.max_minutes:
            p = max(p, (elapsed_before + time.time() - start) / (60 * cfg.max_minutes))
        return p

    stopper = StopFlag()
    start = time.time()
    bar = tqdm(total=cfg.max_steps or None, initial=step, disable=quiet, dynamic_ncols=True, mininterval=1, file=sys.stdout)
    logged, sums, tokens, t_log = {}, {}, 0, time.time()
    for batch in batches:
        if progress() >= 1 or stopper.stop or (not cfg.max_steps and not cfg.max_minutes):
            break
        lr = lr_at(cfg, step, progress())
        for g in opt.param_groups:
            g["lr"] = lr
        b = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast(device):
            parts = diffusion.loss(b["ids"], b["length_mask"], b["cond_mask"])
        opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        step += 1
        tokens += int(batch["length_mask"].sum())
        for k, v in parts.items():  # summed on the device: no host sync every step
            sums[k] = sums.get(k, 0) + v.detach()

        if step % cfg.log_every == 0:
            logged = {k: v.item() / cfg.log_every for k, v in sums.items()}
            if not math.isfinite(logged["loss"]):
                bar.close()
                raise UserError(f"loss is {logged['loss']} at step {step}; stopped. The last good checkpoint "
                                f"is kept in {ckpt_path}; try a lower --lr")
            tok_s = tokens / (time.time() - t_log)
            bar.set_postfix(loss=f"{logged['loss']:.3f}", mse=f"{logged['mse']:.3f}", ce=f"{logged['ce']:.3f}",
                            acc=f"{logged['acc']:.3f}", tok_s=f"{tok_s:.0f}", lr=f"{lr:.1e}")
            logged["tokens_per_s"] = tok_s
            sums, tokens, t_log = {}, 0, time.time()
        bar.update(1)

        if step % cfg.eval_every == 0:
            report(diffusion, tok, corpus, valid, device, step, quiet)
            save()
            t_log, tokens = time.time(), 0  # evaluation time is not training time
    bar.close()
    save()
    if not quiet:
        report(diffusion, tok, corpus, valid, device, step, quiet)
        print(f"saved {ckpt_path} at step {step}")
    return logged


def report(diffusion, tok, corpus, valid, device, step, quiet):
    """Validation numbers and a few unconditional samples, printed above the progress bar."""
    if quiet:
        return
    if valid is not None:
        v = validate(diffusion, valid, device)
        tqdm.write(f"step {step}: valid loss {v['loss']:.3f} mse {v['mse']:.3f} ce {v['ce']:.3f} acc {v['acc']:.3f}")
    from sample import generate  # sample.py imports train-free modules only
    for text in generate(diffusion, tok, num_samples=3, lengths_from=corpus.length_histogram(), seed=step):
        tqdm.write(f"  sample: {text}")


def parse_args(argv=None) -> TrainConfig:
    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, help="training text, UTF-8, one example a line")
    p.add_argument("--valid", default=d.valid, help="held-out text; default: hold out 5%% of --corpus (fixed seed, at most 1000 lines)")
    p.add_argument("--tokenizer", default=d.tokenizer, help="a .model file from tokenizer.py; default: train one into OUT/tokenizer.model")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size, help="vocabulary size when the tokenizer is trained here")
    p.add_argument("--out", default=d.out, help="folder for ckpt.pt and config.json; an existing ckpt.pt there is resumed")
    p.add_argument("--preset", default=d.preset, choices=sorted(PRESETS), help="model size, see model.py")
    p.add_argument("--max-len", type=int, default=d.max_len, help="longest text in tokens, EOS included (0: the preset's)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="lines per step")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="final learning rate as a share of --lr")
    p.add_argument("--warmup", type=int, default=d.warmup, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay on matrices")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="clip the gradient norm to this")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help="stop after this many steps in all (0: no limit)")
    p.add_argument("--max-minutes", type=float, default=d.max_minutes, help="stop after this many minutes of training in all (0: no limit)")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="validate, print samples and save every N steps")
    p.add_argument("--log-every", type=int, default=d.log_every, help="update the progress bar every N steps")
    p.add_argument("--noise-scale", type=float, default=d.noise_scale, help="noise std relative to the cosine schedule's (SNR / scale^2)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for initialisation, data order and noise")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda or mps")
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (0: one per core)")
    a = p.parse_args(argv)
    cfg = TrainConfig(**{k.replace("-", "_"): v for k, v in vars(a).items()})
    for name in ("batch_size", "eval_every", "log_every", "vocab_size"):
        if getattr(cfg, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("max_steps", "max_minutes", "warmup", "max_len", "threads", "weight_decay"):
        if getattr(cfg, name) < 0:
            p.error(f"--{name.replace('_', '-')} must not be negative")
    if not cfg.lr > 0 or not cfg.grad_clip > 0:
        p.error("--lr and --grad-clip must be positive")
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


if __name__ == "__main__":
    main()
