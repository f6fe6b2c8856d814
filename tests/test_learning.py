"""The model learns: a tiny model memorises 16 sentences, then fills a hidden word back in."""
import os

import pytest
import torch

import checkpoint
from conftest import SENTENCES
from sample import generate
from train import TrainConfig, train


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
