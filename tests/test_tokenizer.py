import pytest

from conftest import SENTENCES
from tokenizer import BOS, EOS, PAD, UNK, Tokenizer, train_tokenizer


def test_special_ids(tok):
    assert [tok.piece(i) for i in (PAD, EOS, BOS, UNK)] == ["<pad>", "</s>", "<s>", "<unk>"]


def test_round_trip(tok):
    for s in SENTENCES:
        ids = tok.encode(s)
        assert tok.decode(ids) == s
        assert tok.decode(ids + [EOS, 17, 18]) == s  # decoding stops at EOS
        assert tok.decode(ids + [PAD, PAD]) == s


def test_encode_is_deterministic_unless_asked(tok):
    s = "the red fox sings over the cold engine"
    assert len({tuple(tok.encode(s)) for _ in range(20)}) == 1
    sampled = {tuple(tok.encode(s, sample=True, alpha=0.5)) for _ in range(50)}
    assert len(sampled) > 1
    assert all(tok.decode(list(x)) == s for x in sampled)


def test_rejects_garbage_model():
    with pytest.raises(ValueError):
        Tokenizer(b"this is not a sentencepiece model")


def test_lines_longer_than_sentencepiece_takes(tmp_path):
    """SentencePiece skips lines over 4,192 bytes unless told otherwise; a corpus of whole documents
    a line must still train a tokenizer that knows its words."""
    lines = [" ".join(["alpha beta gamma delta"] * 300) + f" {i}" for i in range(5)]  # ~7,000 bytes each
    tok = train_tokenizer(lines, 40, str(tmp_path / "long"))
    assert tok.decode(tok.encode("gamma delta alpha")) == "gamma delta alpha"
    assert len(tok.encode("gamma delta alpha")) <= 3  # learnt as pieces, not spelt letter by letter


def test_rare_characters_get_a_piece_when_they_fit(tmp_path):
    """A name written once in a corpus ("Zizzi") is text, not UNK, where the characters fit in half
    the vocabulary; SentencePiece's 0.9995 would drop it."""
    lines = SENTENCES * 20 + ["Zizzi serves the lazy dog."]
    default = train_tokenizer(lines, 200, str(tmp_path / "default"))
    assert UNK not in default.encode(lines[-1]) and default.decode(default.encode(lines[-1])) == lines[-1]
    dropped = train_tokenizer(lines, 200, str(tmp_path / "dropped"), character_coverage=0.9995)
    assert UNK in dropped.encode(lines[-1])


def test_many_characters_keep_the_rarest_out(tmp_path):
    """Chinese-like: more characters than half the vocabulary. Giving every one a piece would not fit
    (a vocabulary too small); by default the rarest 0.05% are left to UNK and it trains."""
    common = [chr(0x4E00 + i) for i in range(110)]
    lines = ["".join(common[(j + k) % 110] for k in range(20)) for j in range(550)]  # each 100 times
    lines += [chr(0x9000 + i) for i in range(5)]  # five characters seen once
    tok = train_tokenizer(lines, 116, str(tmp_path / "cjk"))
    assert UNK not in tok.encode(lines[0]) and UNK in tok.encode(lines[-1])
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(lines, 116, str(tmp_path / "all"), character_coverage=1.0)
