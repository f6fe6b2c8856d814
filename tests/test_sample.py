import pytest
import torch

from data import UserError
from diffusion import Diffusion, DiffusionConfig
from model import Estimator, tiny
from sample import fill_template, generate, parse_template
from conftest import SENTENCES
from tokenizer import EOS, PAD, train_tokenizer


def test_parse_template(tok):
    ids, cond, gaps, _ = parse_template("the red fox [gap] over the [gap:2] dog", tok, max_len=64, gap_length=3)
    assert len(ids) == len(cond)
    assert ids[-1] == EOS and cond[-1]
    hidden = [i for i, c in enumerate(cond) if not c]
    assert len(hidden) == 5 and all(ids[i] == PAD for i in hidden)
    assert [b - a for a, b in gaps] == [3, 2] and hidden == [i for a, b in gaps for i in range(a, b)]
    given = [i for i, c in zip(ids, cond) if c][:-1]
    assert tok.decode(given) == "the red fox over the dog"


def test_context_after_a_gap_tokenises_as_in_the_line(tmp_path):
    """Words right after a gap with no space between ("[gap], over", "[gap].") get the ids they have
    inside the whole line: no word-start mark that the line does not have there."""
    tok = train_tokenizer([s.replace(" ", ", ", 1) + "." for s in SENTENCES], 200, str(tmp_path / "punct"))
    for line, word in [("the red fox jumps, over the lazy dog.", "jumps"), ("the cold river runs past the mill.", "mill")]:
        full = tok.encode(line)
        start = len(tok.encode(line[: line.index(word)]))
        end = len(tok.encode(line[: line.index(word) + len(word)]))
        assert tok.encode(line[: line.index(word) + len(word)]) == full[:end]  # the premise: the word ends a piece
        template = f"{line[: line.index(word)]}[gap:{end - start}]{line[line.index(word) + len(word):]}"
        ids, cond, gaps, _ = parse_template(template, tok, max_len=64)
        assert gaps == [(start, end)] and ids[end:-1] == full[end:], template


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
    ("a [gap:2] b [gap:3 c", "bad gap"),  # beside a good gap, a broken one is not taken for text
    ("a [gap:2] b [Gap:3] c", "bad gap"),
    ("[gap:32]", "at most 31 tokens"),  # the EOS takes one of the 32
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
    template = f"[gap:{len(fox)}][gap:{len(fox)}]"  # side by side: two fills, two words
    ids, cond, gaps, _ = parse_template(template, tok, max_len=64)
    for a, b in gaps:
        ids[a:b] = fox
    assert fill_template(template, tok, ids, gaps) == "fox fox"


def test_fill_right_after_text_follows_its_first_piece(tok):
    """Where the template has no space before a gap (a prefix, "un[gap]", Chinese), the fill is set
    apart only when its first piece starts a word."""
    glue = [i for i in range(4, tok.vocab_size) if not tok.piece(i).startswith("\u2581") and tok.piece(i).isalpha()][0]
    word = tok.encode("fox")
    for template in ["the red[gap:1] dog", "the red[gap:1][gap:1] dog"]:
        ids, cond, gaps, _ = parse_template(template, tok, max_len=64)
        for (a, b), fill in zip(gaps, [[glue], word[:1]]):
            ids[a:b] = fill
        text = fill_template(template, tok, ids, gaps)
        assert text.startswith("the red" + tok.piece(glue) + " "), text  # glued on, then a word apart
    ids, cond, gaps, _ = parse_template("the red [gap:1] dog", tok, max_len=64)
    ids[gaps[0][0]] = glue  # after a space the template's spacing stands
    assert fill_template("the red [gap:1] dog", tok, ids, gaps) == f"the red {tok.piece(glue)} dog"


def test_gaps_of_open_length(tok):
    template = "the red fox [gap:..4] over the [gap:2] dog"
    ids, cond, gaps, up_to = parse_template(template, tok, max_len=64)
    (a, b), (c, d) = gaps
    assert b - a == 1 and cond[a] and ids[a] == PAD  # one marker, a context position holding PAD
    assert d - c == 2 and up_to[a] == 4 and sum(up_to) == 4  # the most the gap may take, at the marker only
    ids, cond, gaps, up_to = parse_template(template, tok, max_len=64, open_lengths=iter([3]))
    (a, b), (c, d) = gaps
    assert [b - a, d - c] == [3, 2] and not any(cond[a:b]) and not any(up_to)
    with pytest.raises(UserError, match="needs"):  # a gap of open length may take all its N
        parse_template("the red fox [gap:..30] over the lazy dog", tok, max_len=32)


def test_gaps_of_open_length_get_the_length_the_model_tells(tok):
    cfg = tiny()
    cfg.vocab_size = tok.vocab_size
    diffusion = Diffusion(Estimator(cfg), DiffusionConfig(steps=2, infill_steps=2, infill_candidates=1))
    with torch.no_grad():  # the model says 3 tokens, whatever the context
        diffusion.model.gap_head.weight.zero_()
        diffusion.model.gap_head.bias.copy_(torch.where(torch.arange(cfg.max_len) == 3, 10.0, 0.0))
    seen = []
    generate(diffusion, tok, templates=["the red fox [gap:..8] over the [gap:2] dog", "[gap:..2] the fox"],
             num_samples=2, on_step=lambda i, ids: seen.append(ids))
    words = [len(tok.encode(s)) for s in ("the red fox", "over the", "dog", "the fox")]
    lengths = [int((row != PAD).sum()) for row in seen[-1]]  # the rows as sampled: text, gaps and EOS
    # 3 tokens; where at most 2 may go, 1 and 2 are alike to the model and the lower median is 1
    assert lengths == [words[0] + 3 + words[1] + 2 + words[2] + 1] * 2 + [1 + words[3] + 1] * 2
    # several candidates of a fill: each sampled with the length told once for its template
    seen.clear()
    diffusion.cfg.infill_candidates = 3
    generate(diffusion, tok, templates=["the red fox [gap:..8] over the [gap:2] dog", "[gap:..2] the fox"],
             num_samples=2, on_step=lambda i, ids: seen.append(ids))
    assert [int((row != PAD).sum()) for row in seen[-1]] == [n for n in lengths for _ in range(3)]
    # an untrained head, a fixed gap's noise beside the marker: still one length for all samples of a template
    torch.nn.init.normal_(diffusion.model.gap_head.weight, std=1.0)
    seen.clear()
    generate(diffusion, tok, templates=["[gap:3] the red fox [gap:..20] dog"], num_samples=5, batch_size=2,
             on_step=lambda i, ids: seen.append(ids) if i == 1 else None)
    assert len({int((row != PAD).sum()) for batch in seen for row in batch}) == 1


def test_templates_are_filled_with_the_infill_settings(tok):
    """A fill should be the likeliest text, a sample a varied one: templates default to the
    checkpoint's infill_steps, infill_temperature, infill_spacing and infill_candidates, a prefix or
    no context to its steps, temperature and spacing and one candidate; a given one wins."""
    cfg = tiny()
    cfg.vocab_size = tok.vocab_size
    diffusion = Diffusion(Estimator(cfg), DiffusionConfig(temperature=0.8, infill_temperature=0.3, steps=3,
                                                          infill_steps=2, spacing="sqrt", infill_spacing="quadratic",
                                                          infill_candidates=3))
    used, sample = [], diffusion.sample
    diffusion.sample = lambda *a, **kw: used.append((kw["steps"], kw["temperature"], kw["spacing"],
                                                     kw["candidates"])) or sample(*a, **kw)
    generate(diffusion, tok, templates=["the red fox [gap:2] dog"], num_samples=2)
    generate(diffusion, tok, prefix="the red", num_samples=2)
    generate(diffusion, tok, num_samples=2)
    generate(diffusion, tok, templates=["the red fox [gap:2] dog"], steps=4, temperature=0.6, spacing="uniform",
             candidates=2)
    assert used == [(2, 0.3, "quadratic", 3), (3, 0.8, "sqrt", 1), (3, 0.8, "sqrt", 1), (4, 0.6, "uniform", 2)]
