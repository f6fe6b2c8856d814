import math

import pytest
import torch
import torch.nn.functional as F

from model import PRESETS, Estimator, get_preset, row_chunks, tied_cross_entropy, tiny


def make(vocab=50):
    cfg = tiny()
    cfg.vocab_size = vocab
    torch.manual_seed(0)
    return Estimator(cfg)


def test_presets_build():
    for name in PRESETS:
        cfg = get_preset(name)
        cfg.validate()
    try:
        get_preset("huge")
    except ValueError as e:
        assert "tiny" in str(e)
    else:
        raise AssertionError("unknown preset accepted")


def test_shapes():
    m = make()
    B, L, E = 3, 7, m.cfg.embed_dim
    x = torch.randn(B, L, E)
    mask = torch.ones(B, L, dtype=torch.bool)
    x0_hat = m(x, torch.zeros_like(x), torch.zeros_like(x), torch.rand(B), mask)
    assert x0_hat.shape == (B, L, E)
    logits = m.logits(x0_hat)
    assert logits.shape == (B, L, 50)
    x_interp, tokens = m.interpolate(x0_hat)
    assert x_interp.shape == (B, L, E) and tokens.shape == (B, L)
    # chunked, it is the same as the one-shot formula
    assert torch.allclose(x_interp, logits.softmax(-1) @ m.embeddings(), atol=1e-5)
    assert torch.equal(tokens, logits.argmax(-1))


def test_embeddings_are_normalised():
    m = make()
    norms = m.embeddings().norm(dim=-1)
    assert torch.allclose(norms, torch.full_like(norms, math.sqrt(m.cfg.embed_dim)), atol=1e-4)


def test_time_changes_the_output():
    m = make()
    torch.nn.init.normal_(m.film.weight, std=0.1)  # FiLM starts at zero; give it something to do
    x = torch.randn(1, 5, m.cfg.embed_dim)
    z = torch.zeros_like(x)
    mask = torch.ones(1, 5, dtype=torch.bool)
    a = m(x, z, z, torch.tensor([0.1]), mask)
    b = m(x, z, z, torch.tensor([0.9]), mask)
    assert not torch.allclose(a, b)


def test_padding_does_not_leak():
    """What stands at padded positions must not change the outputs at real positions."""
    m = make()
    x = torch.randn(1, 6, m.cfg.embed_dim)
    z = torch.zeros_like(x)
    mask = torch.tensor([[True] * 4 + [False] * 2])
    a = m(x, z, z, torch.tensor([0.5]), mask)
    x2 = x.clone()
    x2[:, 4:] = torch.randn(1, 2, m.cfg.embed_dim) * 10
    b = m(x2, z, z, torch.tensor([0.5]), mask)
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-5)


def test_interpolation_temperature_sharpens_towards_the_best_token():
    m = make()
    x0_hat = torch.randn(2, 5, m.cfg.embed_dim)
    best_emb = m.embeddings()[m.interpolate(x0_hat)[1]]  # (2, 5, E): the argmax token's embedding
    dist = lambda tau: (m.interpolate(x0_hat, tau)[0] - best_emb).norm(dim=-1).mean()  # noqa: E731
    assert dist(0.5) < dist(1.0) < dist(2.0)
    assert torch.equal(m.interpolate(x0_hat, 0.5)[1], m.interpolate(x0_hat, 2.0)[1])  # argmax unchanged


@pytest.mark.parametrize("expected", [False, True])
def test_tied_cross_entropy_matches_the_plain_formula(expected):
    """Chunked and recomputed in backward, it must equal F.cross_entropy over the full logits, and
    with embeddings given, softmax(logits) @ e, gradients included."""
    g = torch.Generator().manual_seed(0)
    N, E, V = 600, 8, 5000
    assert len(row_chunks(N, V)) > 1  # the test must cross chunk borders
    x = torch.randn(N, E, generator=g, requires_grad=True)
    w = torch.randn(V, E, generator=g, requires_grad=True)
    e = torch.randn(V, E, generator=g, requires_grad=True)
    y = torch.randint(0, V, (N,), generator=g)
    weights = torch.rand(N, generator=g)  # a non-uniform upstream gradient
    up = torch.randn(N, E, generator=g)  # the same for the expected embedding
    if expected:
        ce, pred, mix = tied_cross_entropy(x, w, y, e)
        ((ce * weights).sum() + (mix * up).sum()).backward()
    else:
        ce, pred = tied_cross_entropy(x, w, y)
        (ce * weights).sum().backward()
    grads = [t.grad.clone() if t.grad is not None else torch.zeros_like(t) for t in (x, w, e)]
    x.grad = w.grad = e.grad = None
    logits = x @ w.t()
    ref = F.cross_entropy(logits, y, reduction="none")
    ref_mix = logits.softmax(-1) @ e
    ((ref * weights).sum() + expected * (ref_mix * up).sum()).backward()
    assert torch.allclose(ce, ref, atol=1e-4)
    assert torch.equal(pred, logits.argmax(-1))
    if expected:
        assert torch.allclose(mix, ref_mix, atol=1e-4)
    for got, t in zip(grads, (x, w, e)):
        assert torch.allclose(got, t.grad if t.grad is not None else torch.zeros_like(t), atol=1e-4)
