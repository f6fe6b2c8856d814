"""Measure a checkpoint on held-out lines: denoising, infilling, free samples and their cost.

    python evaluate.py --ckpt runs/demo/ckpt.pt --valid held_out.txt --judge runs/demo/judge.pt --json eval.json
    python evaluate.py --compare before.json after.json   # every number of two runs side by side

denoising: mse, ce and accuracy of x̂0 at fixed t, no context. infilling: the real sampler fills one
hidden span (25-50% of a line) or scattered tokens (15%). gaps of open length: the same spans, each
a gap of up to all the room the model has, whose length the model chooses: fill lengths beside
true lengths, and token accuracy on aligned text (edit distance). samples:
unconditional samples beside held-out lines: judge perplexity (judge.py), unigram entropy,
distinct-2, share copied from training, length. cost: seconds and network evaluations per sample,
and per filled line. Every draw comes from --seed: a rerun gives the same numbers, seconds aside. Compare at equal counts
(--num-samples = --num-lines): distinct-n falls as texts are added.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time
from collections import Counter
from dataclasses import replace

import torch
from torch.nn.utils.rnn import pad_sequence

import checkpoint
from device import pick_device, set_threads
from data import Corpus, UserError, collapse_gaps, read_lines, run, seed_arg, threads_arg
from diffusion import SAMPLERS, SPACINGS, Diffusion, DiffusionConfig, get_sampler, get_spacing
from judge import diffusion_tokenizer, load_judge, perplexity
from results import compare, load, table
from sample import generate
from tokenizer import BOS, EOS, PAD

TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)


# --- metrics: small pure functions ------------------------------------------------------------------

def unigram_entropy(token_lists) -> float:
    """Entropy in nats of the token frequencies pooled over all lists; low when few tokens recur."""
    counts = Counter(t for tokens in token_lists for t in tokens)
    n = sum(counts.values())
    return -sum(c / n * math.log(c / n) for c in counts.values()) if n else 0.0


def distinct_n(texts, n=2) -> float:
    """Unique word n-grams / all word n-grams over all texts (Li et al. 2016); low when samples repeat."""
    grams = [tuple(w[i: i + n]) for text in texts for w in [text.split()] for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def fill_accuracy(pred, target, hidden_mask) -> tuple[float, float]:
    """(B, L) predicted and true ids, (B, L) bool hidden -> (token accuracy on hidden positions,
    share of the rows with a hidden token whose hidden tokens are all right)."""
    right = (pred == target) & hidden_mask
    rows = hidden_mask.any(1)
    exact = (right == hidden_mask).all(1) & rows
    return right.sum().item() / max(1, hidden_mask.sum().item()), exact.sum().item() / max(1, rows.sum().item())


def copied_share(samples, train_set) -> float:
    """Share of samples that are, word for word, a line of the training corpus: memorisation."""
    return sum(s in train_set for s in samples) / len(samples) if samples else 0.0


def edit_distance(a, b) -> int:
    """Levenshtein distance between two sequences: insertions, deletions and substitutions."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def aligned_accuracy(fill, truth) -> float:
    """1 - edit distance / the longer length: token accuracy when the fill's length may differ."""
    return 1 - edit_distance(fill, truth) / max(1, len(fill), len(truth))


def spread(values) -> dict:
    """Mean, standard deviation and the 10/25/50/75/90th percentiles of a list of numbers."""
    q = statistics.quantiles(values, n=20, method="inclusive") if len(values) > 1 else list(values) * 19
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values),
            **{f"p{p}": q[p // 5 - 1] for p in (10, 25, 50, 75, 90)}}


def text_tokens(ids) -> list[int]:
    """The tokens a row's text is made of, as Tokenizer.decode reads it: up to the first EOS, no PAD or BOS."""
    ids = list(ids)
    return [i for i in (ids[: ids.index(EOS)] if EOS in ids else ids) if i not in (PAD, BOS)]


# --- what to hide for infilling: (n,) bool, True = hidden, for a line of n tokens, EOS included ------

def hide_span(n, gen):
    """One contiguous span of 25-50% of the text; EOS stays given, so the length is known."""
    mask, m = torch.zeros(n, dtype=torch.bool), n - 1
    if m > 0:
        k = max(1, round((0.25 + 0.25 * torch.rand((), generator=gen).item()) * m))
        start = int(torch.rand((), generator=gen).item() * (m - k + 1))
        mask[start: start + k] = True
    return mask


def hide_scattered(n, gen, share=0.15):
    """`share` of the text's tokens (at least one) at positions drawn without replacement."""
    mask, m = torch.zeros(n, dtype=torch.bool), n - 1
    if m > 0:
        mask[torch.randperm(m, generator=gen)[: max(1, round(share * m))]] = True
    return mask


HIDE = {"span": hide_span, "scattered": hide_scattered}


def hide(kind, n, gen):
    if kind not in HIDE:
        raise ValueError(f"unknown infilling kind {kind!r}; choose from {', '.join(HIDE)}")
    return HIDE[kind](n, gen)


# --- the sections ----------------------------------------------------------------------------------

@torch.no_grad()
def denoising(diffusion, corpus, times=TIMES, seed=0, batch_size=64) -> dict:
    """{t: {mse, ce, acc}} from Diffusion.loss at each fixed t, token-weighted over all lines. The
    mse is always that of the network's output, also for a checkpoint trained with `expected`
    (whose loss scores the expected embedding): one quantity for every checkpoint."""
    # A copy with self-conditioning off: the caller's config is left as it is.
    plain = Diffusion(diffusion.model, replace(diffusion.cfg, self_cond_rate=0.0, expected=False))
    device = next(diffusion.model.parameters()).device
    order = torch.argsort(corpus.lengths, stable=True).tolist()
    out = {}
    for k, t in enumerate(times):
        gen = torch.Generator(device=device).manual_seed(seed * 1000 + k)
        sums, count = {"mse": 0.0, "ce": 0.0, "acc": 0.0}, 0
        for i in range(0, len(order), batch_size):
            b = {key: v.to(device) for key, v in corpus.batch(order[i: i + batch_size], mask_mode="none").items()}
            parts = plain.loss(b["ids"], b["length_mask"], b["cond_mask"],
                               t=torch.full((len(b["ids"]),), t, device=device), gen=gen)
            n = int(b["length_mask"].sum())
            for key in sums:
                sums[key] += parts[key].item() * n
            count += n
        out[f"{t:g}"] = {key: v / count for key, v in sums.items()}
    return out


@torch.no_grad()
def infilling(diffusion, corpus, kind, steps, sampler, seed=0, batch_size=64, spacing=None, guidance=1.0,
              temperature=None, snap=None, candidates=None) -> dict:
    """Hide tokens of each line as `kind` says, fill them with Diffusion.sample, score the fills.
    steps, spacing, temperature and candidates default to the checkpoint's for templates (infill_*)."""
    device = next(diffusion.model.parameters()).device
    steps, spacing, temperature, candidates = diffusion.cfg.settings(True, steps, spacing, temperature, candidates)
    mask_gen = torch.Generator().manual_seed(seed)
    hidden = pad_sequence([hide(kind, len(ids), mask_gen) for ids in corpus.ids], batch_first=True)  # (N, L)
    target = pad_sequence([torch.tensor(ids) for ids in corpus.ids], batch_first=True, padding_value=PAD)  # (N, L)
    pred = torch.full_like(target, PAD)
    order = torch.argsort(corpus.lengths, stable=True).tolist()
    for i in range(0, len(order), batch_size):
        idx = order[i: i + batch_size]
        b = corpus.batch(idx, mask_mode="none")  # (B, l): rows of similar lengths, padded
        h = hidden[idx, : b["ids"].shape[1]]  # (B, l)
        ids = torch.where(h, PAD, b["ids"])  # the hidden tokens never reach the sampler
        gen = torch.Generator(device=device).manual_seed(seed * 1000 + i)
        out = diffusion.sample(ids.to(device), b["length_mask"].to(device), (b["length_mask"] & ~h).to(device),
                               steps=steps, sampler=sampler, gen=gen, spacing=spacing, guidance=guidance,
                               temperature=temperature, snap=snap, candidates=candidates)
        pred[idx, : out.shape[1]] = out.cpu()
    acc, exact = fill_accuracy(pred, target, hidden)
    return {"acc": acc, "exact": exact, "hidden_share": hidden.sum().item() / (corpus.lengths - 1).sum().item()}


@torch.no_grad()
def open_infilling(diffusion, corpus, steps, sampler, seed=0, batch_size=64, spacing=None, temperature=None,
                   snap=None, candidates=None) -> dict:
    """The spans of infilling(kind="span"), hidden in gaps of open length ([gap:..N]), as sample.py
    fills them: each span is one marker whose length the model tells (Diffusion.gap_lengths, up to
    all the room it has, max_len - (n - k) for a span of k of a line's n tokens), then a gap of that
    many tokens is filled. Scores: the fills' lengths beside the spans' true lengths, and aligned
    token accuracy. steps, spacing, temperature and candidates default to the checkpoint's for
    templates (infill_*)."""
    device = next(diffusion.model.parameters()).device
    steps, spacing, temperature, candidates = diffusion.cfg.settings(True, steps, spacing, temperature, candidates)
    max_len = diffusion.model.cfg.max_len
    mask_gen = torch.Generator().manual_seed(seed)
    hidden = [hide("span", len(ids), mask_gen) for ids in corpus.ids]  # the very spans of infilling()
    rows = [i for i, h in enumerate(hidden) if h.any()]
    fills, truths = [], []
    for i in range(0, len(rows), batch_size):
        idx = rows[i: i + batch_size]
        b = corpus.batch(idx, mask_mode="none")
        start = torch.tensor([int(hidden[j].nonzero()[0]) for j in idx])
        k = torch.tensor([int(hidden[j].sum()) for j in idx])
        lengths = corpus.lengths[idx]
        c = collapse_gaps(b["ids"], lengths, start, k)  # the hidden tokens never reach the model
        up_to = torch.where(c["gap_length"] > 0, max_len - (lengths - k)[:, None], 0)
        guess = diffusion.gap_lengths(c["ids"].to(device), c["length_mask"].to(device), c["cond_mask"].to(device),
                                      up_to.to(device)).sum(1).cpu()  # (B,) tokens the model gives each gap
        cut = [corpus.ids[j][: int(start[r])] + [PAD] * int(guess[r]) + corpus.ids[j][int(start[r] + k[r]):]
               for r, j in enumerate(idx)]
        ids = pad_sequence([torch.tensor(x) for x in cut], batch_first=True, padding_value=PAD)
        pos = torch.arange(ids.shape[1])[None]
        length_mask = pos < torch.tensor([len(x) for x in cut])[:, None]
        gap = (pos >= start[:, None]) & (pos < (start + guess)[:, None])
        gen = torch.Generator(device=device).manual_seed(seed * 1000 + i)
        out = diffusion.sample(ids.to(device), length_mask.to(device), (length_mask & ~gap).to(device), steps=steps,
                               sampler=sampler, gen=gen, spacing=spacing, temperature=temperature, snap=snap,
                               candidates=candidates).cpu()
        for r, j in enumerate(idx):
            fills.append(text_tokens(out[r][gap[r]]))
            truths.append(corpus.ids[j][int(start[r]): int(start[r] + k[r])])
    fill_len, true_len = [len(f) for f in fills], [len(t) for t in truths]
    median = statistics.median(true_len)
    return {"fill_length": spread(fill_len), "true_length": spread(true_len),
            "length_mad": statistics.fmean(abs(a - b) for a, b in zip(fill_len, true_len)),
            # the reference a length guess must beat: the spans' own median length for every line
            "length_mad_median": statistics.fmean(abs(median - b) for b in true_len),
            "length_corr": statistics.correlation(fill_len, true_len) if min(len(set(fill_len)), len(set(true_len))) > 1 else 0.0,
            "aligned_acc": statistics.fmean(aligned_accuracy(f, t) for f, t in zip(fills, truths)),
            "exact": statistics.fmean(f == t for f, t in zip(fills, truths)), "lines": len(rows)}


def unconditional(diffusion, tok, num_samples, steps, sampler, seed, length_hist, batch_size, spacing=None,
                  temperature=None, snap=None):
    """K samples from sample.generate: (texts, their tokens as the model wrote them, seconds)."""
    final, steps = [], diffusion.cfg.settings(False, steps)[0]  # keep_last needs the number generate will use

    def keep_last(i, ids):  # generate calls this per batch and step; the last step is the output (one candidate)
        if i == steps - 1:
            final.extend(text_tokens(row) for row in ids.tolist())

    start = time.perf_counter()
    texts = generate(diffusion, tok, num_samples=num_samples, steps=steps, sampler=sampler, seed=seed,
                     lengths_from=length_hist, batch_size=batch_size, on_step=keep_last, spacing=spacing,
                     temperature=temperature, snap=snap)
    return texts, final, time.perf_counter() - start


def text_stats(texts, tokens, judge, tok, train_set) -> dict:
    """The same numbers for samples and for held-out lines, so that each has its reference."""
    lengths = [len(t) + 1 for t in tokens]  # EOS included, as everywhere in this project
    return {"judge_ppl": perplexity(judge, tok, texts) if judge is not None else None,
            "entropy": unigram_entropy(tokens), "distinct_2": distinct_n(texts, 2),
            "copied": copied_share([" ".join(s.split()) for s in texts], train_set) if train_set else None,
            "length_mean": statistics.fmean(lengths), "length_std": statistics.pstdev(lengths)}


def evaluate(diffusion, tok, valid_lines, judge=None, train_lines=None, length_hist=None, num_lines=200,
             num_samples=200, steps=None, sampler=DiffusionConfig.sampler, seed=0, batch_size=64,
             spacing=None, guidance=1.0, temperature=None, snap=DiffusionConfig.snap, infill_temperature=None,
             infill_spacing=None, infill_steps=None, infill_candidates=None) -> dict:
    """All sections as a dict of plain values (the JSON). Infilling and open gaps are sampled in
    `infill_steps` steps at `infill_temperature` with `infill_spacing`, keeping the consensus of
    `infill_candidates` fills, unconditional samples in `steps` at `temperature` with `spacing`, as
    sample.py does by default; the steps, spacings, temperatures and candidates default to the
    checkpoint's."""
    steps, spacing, temperature, _ = diffusion.cfg.settings(False, steps, spacing, temperature)
    infill_steps, infill_spacing, infill_temperature, infill_candidates = diffusion.cfg.settings(
        True, infill_steps, infill_spacing, infill_temperature, infill_candidates)
    max_len = diffusion.model.cfg.max_len
    pick = torch.randperm(len(valid_lines), generator=torch.Generator().manual_seed(seed))[:num_lines]
    lines = [valid_lines[i] for i in sorted(pick.tolist())]
    corpus = Corpus(lines, tok, max_len)
    corpus.notes("held-out lines")
    # training lines as a sample would spell them: cropped to the model's length, decoded, spaces collapsed
    train_set = None
    if train_lines:
        train_set = {" ".join(tok.decode(ids).split()) for ids in Corpus(train_lines, tok, max_len).ids}
    r = {"settings": {"num_lines": len(lines), "num_samples": num_samples, "steps": steps,
                      "infill_steps": infill_steps, "infill_candidates": infill_candidates, "sampler": sampler, "spacing": spacing,
                      "infill_spacing": infill_spacing, "guidance": guidance, "temperature": temperature,
                      "infill_temperature": infill_temperature, "snap": snap, "seed": seed, "judge": judge is not None,
                      "train": train_set is not None}}
    r["denoising"] = denoising(diffusion, corpus, TIMES, seed, batch_size)
    start = time.perf_counter()
    r["infilling"] = {kind: infilling(diffusion, corpus, kind, infill_steps, sampler, seed, batch_size, infill_spacing,
                                      guidance, infill_temperature, snap, infill_candidates) for kind in HIDE}
    fill_seconds = (time.perf_counter() - start) / (len(HIDE) * len(lines))
    r["open_gaps"] = open_infilling(diffusion, corpus, infill_steps, sampler, seed, batch_size, infill_spacing,
                                    infill_temperature, snap, infill_candidates)
    texts, tokens, seconds = unconditional(diffusion, tok, num_samples, steps, sampler, seed, length_hist, batch_size,
                                           spacing, temperature, snap)
    r["samples"] = text_stats(texts, tokens, judge, tok, train_set)
    r["held_out"] = text_stats([tok.decode(ids) for ids in corpus.ids], [text_tokens(ids) for ids in corpus.ids],
                               judge, tok, train_set)
    # self-conditioning reuses the previous step's estimate: one network evaluation a step, no more
    r["cost"] = {"seconds_per_sample": seconds / num_samples, "evals_per_sample": steps, "batch_size": batch_size,
                 # a filled line: the infilling sections' time per line, and each of its draws' steps
                 "seconds_per_fill": fill_seconds, "evals_per_fill": infill_steps * infill_candidates}
    r["examples"] = texts[:5]
    return r


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: sys.exit(f"error: {message}")  # one line, no usage dump
    p.add_argument("--ckpt", help="checkpoint written by train.py")
    p.add_argument("--valid", help="held-out text, one example a line, never trained on")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="print two --json results side by side, and stop")
    p.add_argument("--judge", default="", help="judge written by judge.py for this checkpoint: adds perplexities")
    p.add_argument("--train", default="", help="training text for the copy check (default: the checkpoint's corpus, if found)")
    p.add_argument("--num-lines", type=int, default=200, help="held-out lines to use (a fixed-seed choice)")
    p.add_argument("--num-samples", type=int, default=200, help="unconditional samples")
    p.add_argument("--steps", type=int, help="denoising steps for unconditional samples (default: the checkpoint's)")
    p.add_argument("--infill-steps", type=int, help="the same, for infilling and gaps of open length")
    p.add_argument("--sampler", default=DiffusionConfig.sampler, help=f"update rule, one of {', '.join(SAMPLERS)}")
    p.add_argument("--spacing", default="", help=f"where the steps fall in t for samples, one of {', '.join(SPACINGS)}; "
                   "default: the checkpoint's")
    p.add_argument("--infill-spacing", default="", help="the same, for infilling and gaps of open length")
    p.add_argument("--infill-candidates", type=int, help="fills drawn for each line, of which the consensus is kept "
                   "(default: the checkpoint's)")
    p.add_argument("--temperature", type=float, help="softmax temperature of the sampler's interpolation, for "
                   "unconditional samples (default: the checkpoint's)")
    p.add_argument("--infill-temperature", type=float, help="the same, for infilling and gaps of open length")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance weight for infilling (1: none)")
    p.add_argument("--snap", type=float, default=DiffusionConfig.snap, help="below this t, step with the likeliest token's embedding")
    p.add_argument("--seed", type=seed_arg, default=0, help="seed of every draw: the same seed gives the same numbers")
    p.add_argument("--batch-size", type=int, default=64, help="lines or samples a batch")
    p.add_argument("--json", default="", help="also write the results to this file")
    p.add_argument("--no-ema", action="store_true", help="use the trained weights, not their moving average")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--threads", type=threads_arg, default=0, help="torch CPU threads (0: one per core)")
    a = p.parse_args(argv)
    if a.compare:
        try:
            print(compare(*map(load, a.compare)), flush=True)
        except UserError as e:
            sys.exit(f"error: {e}")
        except TypeError as e:  # a value that is not a number
            sys.exit(f"error: --compare: {' or '.join(a.compare)} holds a value that is not a number ({e})")
        return
    if not a.ckpt or not a.valid:
        p.error("give --ckpt and --valid (or --compare BEFORE AFTER)")
    counts = (a.num_lines, a.num_samples, a.steps, a.infill_steps, a.batch_size, a.infill_candidates)  # None: the checkpoint's
    if min(x for x in counts if x is not None) < 1 \
            or not all(0 < x < math.inf for x in (a.temperature, a.infill_temperature) if x is not None):
        p.error("--num-lines, --num-samples, --steps, --infill-steps, --infill-candidates and --batch-size must be at least 1; "
                "--temperature and --infill-temperature positive and finite")
    if not math.isfinite(a.guidance) or not math.isfinite(a.snap):
        p.error("--guidance and --snap must be finite")
    set_threads(a.threads)
    try:
        get_sampler(a.sampler), [get_spacing(s) for s in (a.spacing, a.infill_spacing) if s]
    except ValueError as e:
        sys.exit(f"error: {e}")
    try:
        ckpt = checkpoint.load(a.ckpt)
        diffusion_tokenizer(ckpt, a.ckpt)  # a judge or a foreign file given as --ckpt: a clear error
        tok, _, diffusion = checkpoint.build(ckpt, pick_device(a.device), ema=not a.no_ema)
        # not lines that the tokenizer's normalisation erases (only control or zero-width characters)
        valid_lines = [line for line in read_lines(a.valid) if tok.encode(line)]
        if not valid_lines:
            raise UserError(f"--valid {a.valid}: no line has any text left after the tokenizer's normalisation "
                            f"(only control or zero-width characters)")
        judge = None
        if a.judge:
            judge = load_judge(a.judge, next(diffusion.model.parameters()).device, (tok, a.ckpt))[1]
        train_path = a.train or ckpt.get("train_config", {}).get("corpus", "")
        train_lines = read_lines(train_path) if a.train or (train_path and os.path.isfile(train_path)) else None
        if a.json:  # before the work, not after it
            checkpoint.check_output("--json", a.json, (a.ckpt, a.valid, a.judge, train_path))
            if not os.path.isdir(os.path.dirname(os.path.abspath(a.json))):
                raise UserError(f"--json {a.json}: no such folder")
            checkpoint.check_writable(os.path.dirname(os.path.abspath(a.json)), 0, "--json folder")
        if train_lines and os.path.samefile(train_path, a.valid):
            print("note: --valid is the training corpus: the numbers are on lines trained on", file=sys.stderr)
        r = evaluate(diffusion, tok, valid_lines, judge, train_lines, ckpt.get("length_hist"), a.num_lines,
                     a.num_samples, a.steps, a.sampler, a.seed, a.batch_size, a.spacing, a.guidance, a.temperature,
                     a.snap, a.infill_temperature, a.infill_spacing, a.infill_steps, a.infill_candidates)
    except UserError as e:
        sys.exit(f"error: {e}")
    r["settings"].update(checkpoint_step=ckpt.get("step"), train_file=train_path if train_lines else None)
    if a.json:  # first: a reader of the table that goes away (`| head`) must not cost the results
        try:
            with open(a.json, "w") as f:
                json.dump(r, f, indent=2)
        except OSError as e:
            sys.exit(f"error: --json {a.json}: {e.strerror}")
    print(table(r), flush=True)  # flushed here: a reader that goes away (`| head`) is then run()'s to end quietly


if __name__ == "__main__":
    run(main)
