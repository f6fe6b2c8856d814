"""Speed: training and sampling tokens/s, model FLOPs, and this machine's matmul peak.

    python bench.py --preset small --batch-size 64 --length 64
    python bench.py --preset small --precision bf16 --json bench.json

Every figure is the median of --repeats timings after --warmup untimed ones. Model FLOPs
utilisation (MFU) = model FLOPs per token x tokens/s / the matmul peak measured in the same run,
so figures from noisy or different machines compare as ratios. The peak is the best of many
timings, taken before and after the model's: MFU errs low, never high.
"""
import argparse
import json
import statistics
import sys
import time

import torch

from diffusion import Diffusion, DiffusionConfig
from model import PRESETS, build_model, get_preset
from data import run, threads_arg
from device import PRECISIONS, autocast, set_threads, use_bf16


def median_time(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak(dtype, device, repeats=15) -> float:
    """FLOP/s of the fastest of `repeats` n x n matmuls in `dtype`: the ceiling the model's matmuls
    work against (a peak, so the best run, not the median). n is 1024 on a CPU, 8192 on a GPU."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(times)


def flops_per_token(cfg, L: int) -> dict:
    """Matmul FLOPs of one forward pass per position, counted layer by layer (2 per multiply-add)."""
    E, D, V = cfg.embed_dim, cfg.width, cfg.vocab_size
    block = 2 * D * 3 * D + 2 * 2 * L * D + 2 * D * D + 2 * 2 * D * cfg.mlp_ratio * D  # qkv, attention, out, feed-forward
    forward = 2 * 3 * E * D + cfg.depth * block + 2 * D * E + 2 * E * V  # input, blocks, x̂0, logits
    interpolate = 2 * V * E  # softmax(logits) @ embeddings
    # training: forward + backward (2x forward) + a no-grad self-conditioning pass on half the steps
    return {"forward": forward, "train": 3 * forward + 0.5 * (forward + interpolate), "sample_step": forward + interpolate}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: sys.exit(f"error: {message}")  # one line, no usage dump
    p.add_argument("--preset", default="small", choices=sorted(PRESETS), help="model size")
    p.add_argument("--vocab-size", type=int, default=4000, help="vocabulary size")
    p.add_argument("--batch-size", type=int, default=64, help="rows per batch")
    p.add_argument("--length", type=int, default=64, help="tokens per row (all real: no padding)")
    p.add_argument("--steps", type=int, default=DiffusionConfig.infill_steps,
                   help=f"sampling steps (default: the fills'; samples default to {DiffusionConfig.steps})")
    p.add_argument("--sample-batch", type=int, default=8, help="rows sampled at once")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="bf16 autocast or float32 (auto: as train.py decides on this machine)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs first")
    p.add_argument("--repeats", type=int, default=7, help="timed runs; the median is reported")
    p.add_argument("--threads", type=threads_arg, default=0, help="torch CPU threads (0: one per core)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--json", help="also write the results to this file")
    a = p.parse_args()
    if min(a.batch_size, a.length, a.steps, a.sample_batch, a.repeats) < 1:
        p.error("sizes, steps and repeats must be at least 1")
    set_threads(a.threads)
    torch.manual_seed(0)
    dev = torch.device(a.device)
    cfg = get_preset(a.preset)
    cfg.vocab_size, cfg.max_len = a.vocab_size, max(cfg.max_len, a.length)
    model = build_model(cfg).to(dev)
    diffusion = Diffusion(model, DiffusionConfig())
    if a.compile:
        diffusion.net = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    B, L = a.batch_size, a.length
    ids = torch.randint(4, cfg.vocab_size, (B, L), device=dev)
    length_mask = torch.ones(B, L, dtype=torch.bool, device=dev)
    cond_mask = torch.zeros_like(length_mask)
    bf16 = use_bf16(dev, a.precision)
    peak_dtype = torch.bfloat16 if bf16 else torch.float32
    peak = matmul_peak(peak_dtype, dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    flip = [0]

    def train_step():
        flip[0] ^= 1  # self-conditioning on every other step, as on half the batches in training
        with autocast(dev, bf16):
            loss = diffusion.loss(ids, length_mask, cond_mask, self_cond=bool(flip[0]))["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()

    def sample():
        with autocast(dev, bf16):
            diffusion.sample(ids[: a.sample_batch], length_mask[: a.sample_batch], cond_mask[: a.sample_batch], steps=a.steps)
        sync()

    t_train = median_time(train_step, a.warmup, a.repeats)
    t_sample = median_time(sample, 1, max(3, a.repeats // 2))
    peak = max(peak, matmul_peak(peak_dtype, dev))
    f = flops_per_token(cfg, L)
    train_tok_s = B * L / t_train
    sample_tok_s = a.sample_batch * L / t_sample
    res = {
        "preset": a.preset, "device": str(dev), "threads": torch.get_num_threads(), "bf16": bf16, "compile": a.compile,
        "batch_size": B, "length": L, "parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "train_tokens_per_s": train_tok_s, "train_step_ms": 1000 * t_train,
        "train_flops_per_token": f["train"], "matmul_peak_gflops": peak / 1e9,
        "train_mfu": f["train"] * train_tok_s / peak,
        "sample_steps": a.steps, "sample_tokens_per_s": sample_tok_s,
        "sample_flops_per_token": f["sample_step"] * a.steps, "sample_mfu": f["sample_step"] * a.steps * sample_tok_s / peak,
    }
    width = max(map(len, res))
    for k, v in res.items():
        print(f"{k:<{width}}  {v:,.3f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=2)


if __name__ == "__main__":
    run(main)
