import pytest

from conftest import SENTENCES
from tokenizer import BOS, EOS, PAD, UNK, Tokenizer


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
