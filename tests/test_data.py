import pytest
import torch

from data import MASK_MIXTURE, Batches, Corpus, UserError, collapse_gaps, infill_masks, mask_mixture, read_lines, split_valid
from tokenizer import EOS, PAD


def test_read_lines_bad_input(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        read_lines(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n  \n\n")
    with pytest.raises(UserError, match="no text"):
        read_lines(str(tmp_path / "empty.txt"))
    (tmp_path / "latin1.txt").write_bytes("ok\ncaf\xe9\n".encode("latin1"))
    with pytest.raises(UserError, match="line 2: not UTF-8"):
        read_lines(str(tmp_path / "latin1.txt"))
    (tmp_path / "crlf.txt").write_bytes(b"one\r\n\r\ntwo  \r\n")
    assert read_lines(str(tmp_path / "crlf.txt")) == ["one", "two"]
    (tmp_path / "cr.txt").write_bytes(b"one\rtwo\r\rthree")  # classic Mac OS line endings
    assert read_lines(str(tmp_path / "cr.txt")) == ["one", "two", "three"]


def test_split_valid_is_fixed_and_disjoint():
    lines = [f"line {i}" for i in range(200)]
    a, b = split_valid(lines, seed=0)
    assert (a, b) == split_valid(lines, seed=0)
    assert len(b) == 10 and not set(a) & set(b) and len(a) + len(b) == 200
    assert split_valid(lines[:10])[1] is None  # too small to spare a line


def test_corpus_crops_and_appends_eos(tok):
    long = " ".join(["the red fox"] * 20)
    c = Corpus(["a black cat", long], tok, max_len=8)
    assert c.cropped == 1
    assert c.ids[0][-1] == EOS and len(c.ids[1]) == 8 and c.ids[1][-1] == EOS
    assert sum(c.length_histogram()) == 2


def test_corpus_notes_lines_the_tokenizer_does_not_cover(tok, capsys):
    """A tokenizer of another corpus (here: another script) gives UNK for most of the text: a note says so."""
    Corpus(["a black cat", "the red fox"], tok, max_len=32).notes()
    assert capsys.readouterr().err == ""
    Corpus(["a black cat", "ζωή και θάνατος"], tok, max_len=32).notes("held-out lines")
    err = capsys.readouterr().err
    assert "UNK" in err and "held-out lines" in err and len(err.splitlines()) == 1, err


def test_batch_masks(tok):
    c = Corpus(["a black cat sleeps", "the cold river runs past the mill", "hi"], tok, max_len=32)
    b = c.batch([0, 1, 2], torch.Generator().manual_seed(0))
    ids, lm, cm = b["ids"], b["length_mask"], b["cond_mask"]
    assert torch.equal(lm.sum(1), c.lengths)
    assert (ids[~lm] == PAD).all()
    assert not (cm & ~lm).any()  # context only inside the text
    for row, n in zip(ids, c.lengths):
        assert row[n - 1] == EOS


@pytest.mark.parametrize("n", [1, 2, 5, 30])
@pytest.mark.parametrize("uncond_rate", [MASK_MIXTURE["none"], 0.6])
def test_infill_mask_mixture(n, uncond_rate):
    g = torch.Generator().manual_seed(0)
    mix = mask_mixture(uncond_rate)
    assert sum(mix.values()) == pytest.approx(1.0)
    masks = infill_masks(torch.full((2000,), n), 32, g, mix)  # (2000, 32)
    assert not masks[:, n:].any()  # never context past the text
    if n < 2:
        assert not masks.any()
    if n < 30:
        return
    k = masks.sum(1)
    share = lambda rows: rows.float().mean().item()  # noqa: E731
    assert abs(share(k == 0) - uncond_rate) < 0.04
    is_prefix = (0 < k) & (k < n) & (masks.cumsum(1) == torch.arange(1, 33)).gather(1, (k - 1).clamp(min=0)[:, None])[:, 0]
    assert abs(share(is_prefix) - mix["prefix"]) < 0.04
    assert share((0 < k) & (k < n) & ~is_prefix) > mix["spans"]  # spans and scattered


def test_span_masks_hide_contiguous_spans():
    """With only the spans kind, each row hides 1 to 3 runs covering 10-90% of the text."""
    g = torch.Generator().manual_seed(1)
    n = 40
    masks = infill_masks(torch.full((500,), n), n, g, {"none": 0, "prefix": 0, "spans": 1, "scattered": 0})
    hidden = ~masks  # (500, 40)
    runs = (hidden[:, 1:] & ~hidden[:, :-1]).sum(1) + hidden[:, 0]  # starts of hidden runs
    assert (runs >= 1).all() and (runs <= 3).all()
    share = hidden.float().mean(1)
    assert (share >= 0.05).all() and (share <= 0.95).all()


def test_batches_resume_exactly(tok):
    lines = [f"the red fox {w}" for w in "one two three four five six seven eight nine ten".split()] * 3
    c = Corpus(lines, tok, max_len=16)
    a = Batches(c, batch_size=4, seed=1)
    it = iter(a)
    for _ in range(5):
        next(it)
    state = a.state()
    expected = [next(it) for _ in range(12)]  # crosses into the next epoch
    b = Batches(c, batch_size=4, seed=1)
    b.load_state(state)
    got = [x for _, x in zip(range(12), b)]
    for e, g in zip(expected, got):
        for k in e:
            assert torch.equal(e[k], g[k])


def test_batches_group_similar_lengths(tok):
    lines = [("word " * (1 + i % 20)).strip() for i in range(400)]
    c = Corpus(lines, tok, max_len=64)
    b = next(iter(Batches(c, batch_size=20, seed=0)))
    real = b["length_mask"].float().mean().item()
    assert real > 0.8  # random batches would be about 55% real tokens


def test_collapse_gaps_leaves_one_marker_of_the_gaps_length():
    ids = torch.tensor([[5, 6, 7, 8, 1], [9, 10, 1, 0, 0], [11, 12, 1, 0, 0]])
    b = collapse_gaps(ids, torch.tensor([5, 3, 3]), start=torch.tensor([1, 0, 0]), k=torch.tensor([2, 1, 0]))
    assert b["ids"].tolist() == [[5, PAD, 8, 1, PAD], [PAD, 10, 1, PAD, PAD], [11, 12, 1, PAD, PAD]]
    assert b["length_mask"].sum(1).tolist() == [4, 3, 3]
    assert torch.equal(b["cond_mask"], b["length_mask"])  # all context: the row teaches the length only
    assert b["gap_length"].tolist() == [[0, 2, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]]


def test_open_gap_rows(tok):
    lines = [f"the red fox {w} over the lazy dog" for w in "jumps leaps runs walks flies".split()] * 20
    c = Corpus(lines, tok, max_len=32)
    g = torch.Generator().manual_seed(0)
    rows = 0
    for _ in range(10):
        idx = list(range(0, 100, 5))
        b = c.batch(idx, g, open_rate=0.3)
        marked = b["gap_length"] > 0
        assert (marked.sum(1) <= 1).all() and (b["ids"][marked] == PAD).all()
        for r in marked.any(1).nonzero()[:, 0].tolist():
            rows += 1
            line, k, at = c.ids[idx[r]], int(b["gap_length"][r].max()), int(marked[r].nonzero()[0])
            n = b["length_mask"][r].sum().item()
            assert n == len(line) - k + 1 and b["cond_mask"][r, :n].all()
            assert b["ids"][r, :at].tolist() + line[at: at + k] + b["ids"][r, at + 1: n].tolist() == line
            assert 0.25 * (len(line) - 1) - 0.5 <= k <= 0.5 * (len(line) - 1) + 0.5  # a phrase of the line, not most of it
        others = ~marked.any(1)
        assert (b["length_mask"][others].sum(1) == c.lengths[idx][others]).all()  # the other rows as they were
    assert 30 <= rows <= 90  # about 0.3 of 200
