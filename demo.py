"""The offline demo: corpus -> tokenizer -> ~10 minutes of training -> samples and infilling.

    python demo.py                      # corpus: sentences of Python's own standard-library docstrings
    python demo.py --corpus my.txt      # your corpus instead, one example a line

Everything lands in --out (default runs/demo); running it again resumes, or just samples if the
training budget is spent.
"""
import argparse
import os
import random
import signal
import sys

import checkpoint
from data import UserError, die_of, read_lines, run, split_valid, stdlib_sentences
from device import set_threads
from model import PRESETS
from sample import generate
from train import TrainConfig, train

STDLIB_TEMPLATES = [
    "Return the [gap:4] of the [gap:3].",
    "This module provides [gap:8].",
    "If [gap:6], a ValueError is raised.",
]


def hide_span(line: str, rng: random.Random):
    """A template from a held-out line: one run of its words replaced by a gap of as many tokens."""
    words = line.split()
    n = max(1, len(words) // 3)
    start = rng.randrange(0, len(words) - n + 1)
    return " ".join(words[:start]), " ".join(words[start: start + n]), " ".join(words[start + n:])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: sys.exit(f"error: {message}")  # one line, no usage dump
    p.add_argument("--corpus", help="your corpus, one example a line (default: Python docstring sentences)")
    p.add_argument("--out", default="runs/demo", help="folder for the corpus, tokenizer and checkpoint")
    p.add_argument("--minutes", type=float, default=10, help="training time budget")
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS),
                   help="model size (see model.py); cpu is sized for minutes of a CPU (README, presets)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the checkpoint's)")
    a = p.parse_args()
    if not 0 < a.minutes < float("inf") or (a.steps is not None and a.steps < 1):
        p.error("--minutes must be positive and finite, and --steps at least 1")
    try:
        corpus = a.corpus
        if corpus is None:
            corpus = os.path.join(a.out, "corpus.txt")
            if not os.path.exists(corpus):
                os.makedirs(a.out, exist_ok=True)
                lines = stdlib_sentences()
                with open(corpus, "w", encoding="utf-8") as f:
                    f.write("\n".join(lines) + "\n")
                print(f"wrote {corpus}: {len(lines)} sentences from the standard library's docstrings")
        print(f"training the '{a.preset}' preset on {corpus} for {a.minutes:g} minutes (Ctrl-C stops and saves)")
        try:
            train(TrainConfig(corpus=corpus, out=a.out, preset=a.preset, max_minutes=a.minutes, eval_every=1000))
        except checkpoint.Stopped as e:  # saved; after Ctrl-C the demo goes on with what was trained
            if e.signum != signal.SIGINT:  # a kill or a closed terminal: it ends
                die_of(e.signum)

        ckpt = checkpoint.load(os.path.join(a.out, "ckpt.pt"))
        tok, model, diffusion = checkpoint.build(ckpt, "cpu")
        hist = ckpt["length_hist"]
        print("\n== unconditional samples ==")
        for text in generate(diffusion, tok, num_samples=6, steps=a.steps, lengths_from=hist, seed=0):
            print(" ", text)

        _, held_out = split_valid(read_lines(corpus), seed=0)  # the lines train.py held out
        rng = random.Random(0)
        # gaps of open length only where training taught them (train.py --open-rate)
        open_gaps = checkpoint.knows_gap_lengths(ckpt)
        print("\n== infilling held-out lines: [the hidden words] -> the fill of [gap:N], N their length"
              + (", and of [gap:..2N], where the model chooses the length ==" if open_gaps else " =="))
        for line in rng.sample(held_out or [], min(4, len(held_out or []))):
            before, hidden, after = hide_span(line, rng)
            n = len(tok.encode(hidden))
            print(f"  {before} [{hidden}] {after}")
            gaps = [f"[gap:{n}]"] + ([f"[gap:..{min(2 * n, model.cfg.max_len // 2)}]"] if open_gaps else [])
            for gap in gaps:
                try:
                    fill = generate(diffusion, tok, templates=[f"{before} {gap} {after}"], steps=a.steps, seed=1)[0]
                except UserError:  # a line too long for the model with the wider gap
                    continue
                print(f"  -> {fill}")
        if a.corpus is None:
            print("\n== templates ==")
            for t in STDLIB_TEMPLATES:
                for text in generate(diffusion, tok, templates=[t], steps=a.steps, seed=2):  # the consensus of 8
                    print(f"  {t}\n  -> {text}")
        print(f"\nmore: python sample.py --ckpt {a.out}/ckpt.pt --template \"... [gap] ...\" --show-steps")
    except UserError as e:
        sys.exit(f"error: {e}")
    except BrokenPipeError:  # `demo.py | head`: run() ends it quietly
        raise
    except OSError as e:  # --out names a file, or a folder we may not write
        sys.exit(f"error: --out {a.out}: {e.strerror or e}")


if __name__ == "__main__":
    set_threads()
    run(main)
