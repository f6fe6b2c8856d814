import pytest

from data import UserError
from diffusion import Diffusion, DiffusionConfig
from model import Estimator, tiny
from sample import fill_template, generate, parse_template
from tokenizer import EOS, PAD


def test_parse_template(tok):
    ids, cond, gaps, _ = parse_template("the red fox [gap] over the [gap:2] dog", tok, max_len=64, gap_length=3)
    assert len(ids) == len(cond)
    assert ids[-1] == EOS and cond[-1]
    hidden = [i for i, c in enumerate(cond) if not c]
    assert len(hidden) == 5 and all(ids[i] == PAD for i in hidden)
    assert [b - a for a, b in gaps] == [3, 2] and hidden == [i for a, b in gaps for i in range(a, b)]
    given = [i for i, c in zip(ids, cond) if c][:-1]
    assert tok.decode(given) == "the red fox over the dog"


def test_gap_at_the_edges(tok):
    ids, cond, _, _ = parse_template("[gap:2] the lazy dog [gap:1]", tok, max_len=64)
    assert cond[:2] == [False, False] and cond[-2:] == [False, True]


@pytest.mark.parametrize("template, message", [
    ("no gap in here", "no gap"),
    ("a [gap:0] b", "bad gap"),
    ("a [gap:-3] b", "bad gap"),
    ("a [gap:x] b", "bad gap"),
    ("a [gap:60] b", "at most"),
    ("a [gap:..0] b", "bad gap"),
    ("a [gap:...3] b", "bad gap"),
    ("a [gap:..] b", "bad gap"),
    ("a [gap:..60] b", "at most"),
])
def test_bad_templates(tok, template, message):
    with pytest.raises(UserError, match=message):
        parse_template(template, tok, max_len=32)


def test_fill_keeps_context_words(tok):
    template = "the red fox [gap:2] over the [gap] dog."
    ids, cond, gaps, _ = parse_template(template, tok, max_len=64, gap_length=2)
    # pieces without a word start, which decoded with their neighbours would glue onto them
    glue = [i for i in range(4, tok.vocab_size) if not tok.piece(i).startswith("▁")][:2]
    for a, b in gaps:
        ids[a:b] = glue
    text = fill_template(template, tok, ids, gaps)
    assert text.startswith("the red fox ") and " over the " in text and text.endswith(" dog.")
    fox = tok.encode("fox")
    template = f"[gap:{len(fox)}], then [gap:{len(fox)}]."
    ids, cond, gaps, _ = parse_template(template, tok, max_len=64)
    for a, b in gaps:
        ids[a:b] = fox
    assert fill_template(template, tok, ids, gaps) == "fox, then fox."


def test_gaps_of_open_length(tok):
    template = "the red fox [gap:..4] over the [gap:2] dog"
    ids, cond, gaps, pad_ok = parse_template(template, tok, max_len=64)
    assert [b - a for a, b in gaps] == [4, 2] and len(pad_ok) == len(ids)
    (a, b), (c, d) = gaps
    assert [i for i, ok in enumerate(pad_ok) if ok] == list(range(a, b))  # padding allowed in the open gap only
    fox = tok.encode("fox")
    ids[a:b] = fox + [PAD] * (4 - len(fox))  # the model used part of the gap; decoding drops the padding
    ids[c:d] = (fox * 2)[:2]
    assert fill_template(template, tok, ids, gaps).startswith("the red fox fox over the ")


def test_templates_are_filled_with_the_infill_settings(tok):
    """A fill should be the likeliest text, a sample a varied one: templates default to the
    checkpoint's infill_temperature and infill_spacing, a prefix or no context to its temperature
    and spacing; a given one wins."""
    cfg = tiny()
    cfg.vocab_size = tok.vocab_size
    diffusion = Diffusion(Estimator(cfg), DiffusionConfig(temperature=0.8, infill_temperature=0.3, steps=2,
                                                          spacing="sqrt", infill_spacing="quadratic"))
    used, sample = [], diffusion.sample
    diffusion.sample = lambda *a, **kw: used.append((kw["temperature"], kw["spacing"])) or sample(*a, **kw)
    generate(diffusion, tok, templates=["the red fox [gap:2] dog"], num_samples=2)
    generate(diffusion, tok, prefix="the red", num_samples=2)
    generate(diffusion, tok, num_samples=2)
    generate(diffusion, tok, templates=["the red fox [gap:2] dog"], temperature=0.6, spacing="uniform")
    assert used == [(0.3, "quadratic"), (0.8, "sqrt"), (0.8, "sqrt"), (0.6, "uniform")]
