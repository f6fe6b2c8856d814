"""The model learns: a tiny model memorises 16 sentences, then fills a hidden word back in; and
one trained on lines of one to four of them tells how long a hidden span is."""
import json
import os
import random
import statistics

import pytest
import torch

import checkpoint
from conftest import SENTENCES
from data import Corpus, open_gaps
from sample import generate
from train import PEAK_LR, TrainConfig, train


@pytest.fixture(scope="module")
def trained(corpus_file, tok, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("learn"))
    train(TrainConfig(corpus=corpus_file, tokenizer=tok_path(tok, out), out=out, preset="tiny", batch_size=16,
                      lr=3e-3, warmup=20, max_steps=600, eval_every=10_000, seed=0), quiet=True)
    return checkpoint.build(checkpoint.load(os.path.join(out, "ckpt.pt")))


def tok_path(tok, folder):
    path = os.path.join(folder, "tok.model")
    with open(path, "wb") as f:
        f.write(tok.model_bytes)
    return path


def test_memorises_at_low_noise(trained):
    tok, model, diffusion = trained
    rows = [tok.encode(s) + [1] for s in SENTENCES]
    L = max(map(len, rows))
    ids = torch.tensor([r + [0] * (L - len(r)) for r in rows])
    length_mask = ids != 0
    out = diffusion.loss(ids, length_mask, torch.zeros_like(length_mask), t=torch.full((len(rows),), 0.1),
                         gen=torch.Generator().manual_seed(0))
    assert out["acc"].item() >= 0.95


def test_infills_a_hidden_word(trained):
    tok, model, diffusion = trained
    sentence = SENTENCES[7]  # "the tall ship sails across the sea"
    words = sentence.split()
    hidden = words[3]  # "sails"
    n = len(tok.encode(hidden))
    template = " ".join(words[:3]) + f" [gap:{n}] " + " ".join(words[4:])
    fills = [generate(diffusion, tok, templates=[template], seed=s, steps=20)[0] for s in range(10)]
    assert sum(f == sentence for f in fills) >= 8, fills


@pytest.fixture(scope="module")
def lengths_taught(tok, tmp_path_factory):
    """Lines of one to four of the sentences, so that the length of a hidden span varies with the
    line's; half the rows teach the gap's length (open_gaps)."""
    out = tmp_path_factory.mktemp("gaps")
    rng = random.Random(0)
    lines = [" ".join(rng.sample(SENTENCES, rng.randint(1, 4))) for _ in range(400)]
    (out / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    train(TrainConfig(corpus=str(out / "corpus.txt"), tokenizer=tok_path(tok, str(out)), out=str(out), preset="tiny",
                      batch_size=16, lr=3e-3, warmup=20, max_steps=1500, eval_every=10_000, open_rate=0.5, seed=0),
          quiet=True)
    tok, model, diffusion = checkpoint.build(checkpoint.load(str(out / "ckpt.pt")))
    return tok, diffusion, Corpus(lines[:64], tok, model.cfg.max_len)


def test_tells_how_long_a_gap_is(lengths_taught):
    """Spans of 64 training lines, each collapsed to a marker of up to 40 tokens: the lengths the
    model gives follow the spans' (with the shared weight of the length's loss, GAP_WEIGHT)."""
    tok, diffusion, corpus = lengths_taught
    L = int(corpus.lengths.max())
    b = open_gaps(corpus.table[:, :L], corpus.lengths, torch.Generator().manual_seed(5))
    up_to = torch.where(b["gap_length"] > 0, 40, 0)
    guess = diffusion.gap_lengths(b["ids"], b["length_mask"], b["cond_mask"], up_to).sum(1).tolist()
    truth = b["gap_length"].sum(1).tolist()
    median = statistics.median(truth)
    mad = statistics.fmean(abs(g - t) for g, t in zip(guess, truth))
    assert len(set(guess)) > 1 and statistics.correlation(guess, truth) > 0.6, (guess, truth)
    assert mad < statistics.fmean(abs(median - t) for t in truth)  # better than one length for all


def test_the_peak_learning_rate_is_the_presets_unless_given_and_a_resumed_run_keeps_its_own(corpus_file, tok, tmp_path):
    def lr_of(out, **kw):
        train(TrainConfig(corpus=corpus_file, tokenizer=tok_path(tok, str(tmp_path)), out=str(tmp_path / out),
                          batch_size=16, eval_every=10_000, **{"max_steps": 1, **kw}), quiet=True)
        with open(tmp_path / out / "config.json") as f:
            return json.load(f)["train"]["lr"]

    assert lr_of("cpu", preset="cpu") == PEAK_LR["cpu"] != 1e-3
    assert lr_of("tiny", preset="tiny") == 1e-3
    assert lr_of("given", preset="cpu", lr=5e-4) == 5e-4
    assert lr_of("given", preset="cpu", max_steps=2) == 5e-4  # resumed without --lr: not the preset's
    assert lr_of("given", preset="cpu", max_steps=3, lr=7e-4) == 7e-4  # resumed with one: that one
