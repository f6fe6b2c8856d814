"""A small left-to-right transformer language model that judges how much samples read like the corpus.

    python judge.py --corpus data/corpus.txt --ckpt runs/demo/ckpt.pt --out runs/demo/judge.pt --max-minutes 10

This is the lm-score of Diffusion-LM (Li et al. 2022): an ordinary autoregressive model, trained on
the diffusion model's training corpus with the diffusion checkpoint's own tokenizer, scores samples
by their perplexity. Lower is closer to the corpus; compare with its perplexity on held-out lines.
The diffusion model cannot score itself this way: it has no tractable likelihood.
"""
import argparse
import contextlib
import math
import os
import sys
import time
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint
from data import Batches, Corpus, UserError, die_of, quiet_stdout, read_lines, run, seed_arg, split_valid, threads_arg
from model import PRESETS, FeedForward, ModelConfig, get_preset
from tokenizer import BOS, Tokenizer
from device import autocast, pick_device, set_threads, use_bf16
from train import TrainConfig, lr_at


class CausalBlock(nn.Module):
    """Pre-norm block: causal self-attention, then the feed-forward of model.py."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads = cfg.heads
        self.norm1, self.norm2 = nn.LayerNorm(cfg.width), nn.LayerNorm(cfg.width)
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.out = nn.Linear(cfg.width, cfg.width)
        self.ff = FeedForward(cfg)

    def forward(self, x):  # x: (B, L, D)
        B, L, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        # Each position attends to itself and the ones before it only. Padding follows the text, so
        # no real token ever sees it: no padding mask is needed.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, L, Dh)
        x = x + self.out(y.transpose(1, 2).reshape(B, L, D))
        return x + self.ff(self.norm2(x))


class CausalLM(nn.Module):
    """Token embedding plus learned positions, causal blocks, a final LayerNorm and a head tied to
    the token embedding. Reads ModelConfig's vocab_size, max_len, width, depth, heads and mlp_ratio."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos = nn.Embedding(cfg.max_len, cfg.width)
        self.blocks = nn.ModuleList(CausalBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        for b in self.blocks:  # residual branches start small, as in model.py (GPT-2's scaled init)
            nn.init.normal_(b.out.weight, std=0.02 / math.sqrt(2 * cfg.depth))
            nn.init.normal_(b.ff.down.weight, std=0.02 / math.sqrt(2 * cfg.depth))

    def forward(self, ids):  # ids: (B, L) -> logits (B, L, V)
        h = self.embed(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))  # (B, L, D)
        for block in self.blocks:
            h = block(h)
        return self.norm(h) @ self.embed.weight.t()


def token_nll(judge, ids, length_mask):
    """(B, L) ids, each text ending in EOS then PAD -> (B, L) negative log-likelihood of each token
    given BOS and the tokens before it; 0 on padding. EOS counts: ending well is part of the text."""
    inp = torch.cat([torch.full_like(ids[:, :1], BOS), ids[:, :-1]], dim=1)  # (B, L): shifted right
    logits = judge(inp).float()  # (B, L, V)
    nll = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none").view(ids.shape)
    return nll * length_mask


@torch.no_grad()
def perplexity(judge, tok, texts, batch_size=64) -> float:
    """exp(mean NLL per token, EOS included) of `texts` under the judge; no randomness involved."""
    if not texts:
        raise ValueError("perplexity of no texts")
    corpus = Corpus(list(texts), tok, judge.cfg.max_len)
    device = next(judge.parameters()).device
    order = torch.argsort(corpus.lengths, stable=True).tolist()  # similar lengths together: less padding
    total, count = 0.0, 0
    for i in range(0, len(order), batch_size):
        b = corpus.batch(order[i: i + batch_size], mask_mode="none")
        nll = token_nll(judge, b["ids"].to(device), b["length_mask"].to(device))
        total += nll.double().sum().item()
        count += int(b["length_mask"].sum())
    return math.exp(total / count)


def fit(judge, corpus: Corpus, max_steps=0, max_minutes=0.0, batch_size=64, lr=1e-3, warmup=100, seed=0,
        quiet=True, stop=None) -> int:
    """Train the judge in place with AdamW and train.py's schedule, until max_steps or max_minutes.
    Ctrl-C stops early and keeps what was learnt (with `stop`, a checkpoint.StopFlag: after the step,
    and SIGTERM or a closed terminal too). Returns the number of steps taken."""
    if not max_steps and not max_minutes:
        raise ValueError("give max_steps or max_minutes")
    device = next(judge.parameters()).device
    sched = TrainConfig(lr=lr, warmup=warmup)
    params = list(judge.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.01},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.99))
    judge.train()
    bf16 = use_bf16(device, "auto")
    step, start = 0, time.time()
    bar = tqdm(total=max_steps or None, disable=quiet, dynamic_ncols=True, mininterval=1, file=sys.stdout)
    try:
        for batch in Batches(corpus, batch_size, seed=seed):  # its infilling masks are not used
            progress = max(step / max_steps if max_steps else 0.0,
                           (time.time() - start) / (60 * max_minutes) if max_minutes else 0.0)
            if progress >= 1 or (stop and stop.stop):
                break
            for g in opt.param_groups:
                g["lr"] = lr_at(sched, step, progress)
            ids, mask = batch["ids"].to(device), batch["length_mask"].to(device)
            with autocast(device, bf16):
                loss = token_nll(judge, ids, mask).sum() / mask.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            if step % 50 == 0:
                value = loss.item()
                if not math.isfinite(value):
                    raise UserError(f"judge loss is {value} at step {step}; try a lower --lr")
                bar.set_postfix(loss=f"{value:.3f}", ppl=f"{math.exp(min(value, 50)):.1f}")
            bar.update(1)
    except (KeyboardInterrupt, BrokenPipeError) as e:  # Ctrl-C, or stdout's reader gone (`| head`)
        if isinstance(e, BrokenPipeError):
            quiet_stdout()
        with contextlib.suppress(OSError):
            tqdm.write("stopping: saving the judge as it is", file=sys.stderr)
    with contextlib.suppress(OSError):
        bar.close()
    if not all(torch.isfinite(p).all() for p in params):
        raise UserError("the judge's loss diverged (not finite); nothing saved. Try a lower --lr")
    judge.eval()
    return step


def save_judge(path, judge, tok, **extra):
    """Atomic save (checkpoint.save): weights, config and the tokenizer's bytes, plain values only."""
    checkpoint.save(path, kind="judge", model=judge.state_dict(), judge_config=asdict(judge.cfg),
                    tokenizer=tok.model_bytes, **extra)


def load_judge(path, device="cpu", expect=None):
    """(tokenizer, judge) from a file written by judge.py; loaded with weights_only=True. With
    expect=(tokenizer, its checkpoint's path), a judge with another tokenizer is a UserError."""
    ckpt = checkpoint.load(path)
    if ckpt.get("kind") != "judge":
        raise UserError(f"{path}: not a judge; write one with judge.py")
    try:
        tok = Tokenizer(ckpt["tokenizer"])
    except ValueError as e:
        raise UserError(f"{path}: judge's tokenizer: {e}") from None
    if expect is not None and expect[0].model_bytes != tok.model_bytes:
        raise UserError(f"{path} was trained with another tokenizer than {expect[1]}; "
                        f"train a judge for it: python judge.py --ckpt {expect[1]} ...")
    judge = CausalLM(checkpoint.config_from(ModelConfig, ckpt["judge_config"], "judge"))
    checkpoint.load_state(judge, ckpt["model"])
    return tok, judge.to(device).eval()


def diffusion_tokenizer(ckpt: dict, path: str):
    """(tokenizer, max_len) of a diffusion checkpoint from train.py: what the judge must share."""
    if ckpt.get("kind") == "judge" or "model_config" not in ckpt or "tokenizer" not in ckpt:
        raise UserError(f"{path}: not a diffusion checkpoint; give the ckpt.pt written by train.py")
    try:
        return Tokenizer(ckpt["tokenizer"]), int(ckpt["model_config"]["max_len"])
    except ValueError as e:
        raise UserError(f"{path}: checkpoint's tokenizer: {e}") from None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: sys.exit(f"error: {message}")  # one line, no usage dump
    p.add_argument("--corpus", required=True, help="the diffusion model's training text, one example a line")
    p.add_argument("--ckpt", required=True, help="the diffusion checkpoint: its tokenizer and max length are used")
    p.add_argument("--out", required=True, help="file to write the judge to, e.g. runs/demo/judge.pt")
    p.add_argument("--valid", default="", help="held-out text: print the judge's perplexity on it at the end")
    p.add_argument("--preset", default="small", choices=sorted(PRESETS), help="judge size, see model.py")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: no limit)")
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop after this many minutes (0: no limit)")
    p.add_argument("--batch-size", type=int, default=64, help="lines per step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    p.add_argument("--seed", type=seed_arg, default=0, help="seed for initialisation and data order")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--threads", type=threads_arg, default=0, help="torch CPU threads (0: one per core)")
    a = p.parse_args(argv)
    if a.max_steps < 0 or a.max_minutes < 0 or a.warmup < 0:
        p.error("--max-steps, --max-minutes and --warmup must not be negative")
    if a.batch_size < 1 or not a.lr > 0:
        p.error("--batch-size must be at least 1 and --lr positive")
    if not a.max_steps and not a.max_minutes:
        p.error("give --max-steps or --max-minutes (or both)")
    if not math.isfinite(a.max_minutes) or not math.isfinite(a.lr):
        p.error("--max-minutes and --lr must be finite")
    set_threads(a.threads)
    torch.manual_seed(a.seed)
    try:
        device = pick_device(a.device)
        checkpoint.check_output("--out", a.out, (a.ckpt, a.corpus, a.valid))
        ckpt = checkpoint.load(a.ckpt)
        tok, max_len = diffusion_tokenizer(ckpt, a.ckpt)
        lines = read_lines(a.corpus)
        trained = ckpt.get("train_config", {})
        same = os.path.isfile(trained.get("corpus", "")) and os.path.samefile(trained["corpus"], a.corpus)
        if not trained.get("valid") and same:
            # train.py held out a share of this corpus: the judge must not learn those lines either
            lines = split_valid(lines, seed=trained.get("seed", 0))[0]
        valid = read_lines(a.valid) if a.valid else None
        checkpoint.check_writable(os.path.dirname(os.path.abspath(a.out)), 0)
        cfg = get_preset(a.preset)
        cfg.vocab_size, cfg.max_len = tok.vocab_size, max_len
        judge = CausalLM(cfg).to(device)
        corpus = Corpus(lines, tok, max_len)
        corpus.notes()
        n_params = sum(p.numel() for p in judge.parameters())
        print(f"judge: {n_params / 1e6:.2f} M parameters, {len(corpus)} lines, device {device}")
        stopper = checkpoint.StopFlag()
        try:
            steps = fit(judge, corpus, a.max_steps, a.max_minutes, a.batch_size, a.lr, a.warmup, a.seed, quiet=False,
                        stop=stopper)
        finally:
            stopper.release()
        save_judge(a.out, judge, tok, step=steps, corpus=a.corpus)
        print(f"saved {a.out} after {steps} steps")
        if stopper.signum:  # saved; now end as the signal would have (train.py does the same)
            die_of(stopper.signum)
        if valid:
            print(f"held-out perplexity {perplexity(judge, tok, valid):.2f} ({len(valid)} lines of {a.valid})")
    except UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    run(main)
