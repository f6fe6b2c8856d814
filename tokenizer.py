"""SentencePiece tokenizer: train one on a corpus, then encode and decode text.

    python tokenizer.py --corpus data/corpus.txt --vocab-size 4000 --out data/tok
writes data/tok.model (what train.py needs) and data/tok.vocab (to read).

Special ids are fixed so that every part of the project can rely on them:
    pad = 0   fills positions after the end of a text
    eos = 1   ends every text
    bos = 2   reserved; this project never adds it
    unk = 3   a character the model has never seen
"""
import argparse
import os
import re
import sys
import tempfile

import sentencepiece as spm

PAD, EOS, BOS, UNK = 0, 1, 2, 3
SPECIAL = (PAD, EOS, BOS, UNK)  # ids that are not text: the sampler never writes them


class Tokenizer:
    """Wraps a SentencePiece model. `encode` is deterministic unless `sample=True`."""

    def __init__(self, model_bytes: bytes):
        self.model_bytes = bytes(model_bytes)  # kept so a checkpoint can carry the tokenizer
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(self.model_bytes)
        except Exception:
            raise ValueError("not a SentencePiece model") from None
        if (self.sp.pad_id(), self.sp.eos_id(), self.sp.bos_id(), self.sp.unk_id()) != (PAD, EOS, BOS, UNK):
            raise ValueError("tokenizer was not trained by tokenizer.py (special ids differ)")

    @classmethod
    def load(cls, path: str) -> "Tokenizer":
        with open(path, "rb") as f:
            return cls(f.read())

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str, sample: bool = False, alpha: float = 0.1) -> list[int]:
        """Text -> ids, without EOS. `sample=True` draws a random segmentation (subword
        regularisation, Kudo 2018): an augmentation for training, never the default."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates, e.g. from undecodable bytes on a command line
            text = text.encode("utf-8", "replace").decode("utf-8")  # each becomes "?"
        if sample:
            return self.sp.encode(text, enable_sampling=True, alpha=alpha, nbest_size=-1)
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        """Ids -> text. Stops at the first EOS and drops padding."""
        ids = [int(i) for i in ids]
        if EOS in ids:
            ids = ids[: ids.index(EOS)]
        return self.sp.decode([i for i in ids if i not in (PAD, BOS)])

    def piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))


def train_tokenizer(lines: list[str], vocab_size: int, out: str, max_sentences: int = 1_000_000,
                    character_coverage: float | None = None) -> Tokenizer:
    """Train a BPE model on `lines`; write `out`.model and `out`.vocab.

    Corpora larger than `max_sentences` lines are sampled, so memory stays bounded.
    The vocabulary may come out smaller than asked on a tiny corpus (hard_vocab_limit=False).
    `character_coverage` is the share of the corpus's characters that get a piece; the rest are UNK,
    which the sampler never writes. By default every character gets one where they all fit in half
    the vocabulary (English, Russian, code, emoji: "Zizzi" is not "⁇izzi"), else 0.9995, as
    SentencePiece advises for Chinese and Japanese, whose rarest characters would crowd it."""
    if character_coverage is None:
        character_coverage = 1.0 if len(set().union(*lines)) <= vocab_size // 2 else 0.9995
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    # SentencePiece reads a file; give it the cleaned lines so that what it sees is what train.py sees.
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt", delete=False) as f:
        f.write("\n".join(lines) + "\n")
        tmp = f.name
    try:
        spm.SentencePieceTrainer.train(
            input=tmp, model_prefix=out, vocab_size=vocab_size, model_type="bpe",
            pad_id=PAD, eos_id=EOS, bos_id=BOS, unk_id=UNK,
            character_coverage=character_coverage, hard_vocab_limit=False,
            input_sentence_size=max_sentences, shuffle_input_sentence=True,
            max_sentence_length=max([4192] + [len(s.encode()) for s in lines]),  # it skips longer lines
            num_threads=os.cpu_count() or 1, minloglevel=2,
        )
    except RuntimeError as e:  # e.g. a vocabulary smaller than the corpus's characters
        small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", str(e))
        if small:  # SentencePiece's own message names an option of its CLI, not of ours
            raise ValueError(f"a vocabulary of {vocab_size} pieces is too small for this corpus's characters: "
                             f"give --vocab-size {small[2]} or more") from None
        raise ValueError(f"SentencePiece could not train on this corpus: {str(e).splitlines()[0]}") from None
    finally:
        os.remove(tmp)
    return Tokenizer.load(out + ".model")


def main():
    p = argparse.ArgumentParser(description="Train a SentencePiece BPE tokenizer on a corpus, one example a line.")
    p.error = lambda message: sys.exit(f"error: {message}")  # one line, no usage dump
    p.add_argument("--corpus", required=True, help="text file, UTF-8, one example a line")
    p.add_argument("--vocab-size", type=int, default=4000, help="number of pieces, special ids included")
    p.add_argument("--out", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--max-sentences", type=int, default=1_000_000, help="sample at most this many lines")
    p.add_argument("--character-coverage", type=float, help="share of the characters that get a piece, the rest "
                   "being UNK (default: 1 where they fit in half the vocabulary, else 0.9995)")
    args = p.parse_args()
    if args.vocab_size < 8 or args.max_sentences < 1:
        sys.exit("error: --vocab-size must be at least 8 and --max-sentences at least 1")
    if args.character_coverage is not None and not 0.98 <= args.character_coverage <= 1:
        sys.exit("error: --character-coverage must be between 0.98 and 1")
    if args.out.endswith(".model"):  # `--out runs/tok.model` means the prefix runs/tok
        args.out = args.out[: -len(".model")]
    if args.out.endswith(("/", os.sep)) or os.path.isdir(args.out):
        sys.exit(f"error: --out {args.out} is a folder; give a prefix such as {os.path.join(args.out, 'tok')}")
    from data import UserError, read_lines  # data.py imports this file, so import it late

    try:
        folder = os.path.dirname(os.path.abspath(args.out))
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()  # fail on the output folder before training, not after
        tok = train_tokenizer(read_lines(args.corpus), args.vocab_size, args.out, args.max_sentences,
                              args.character_coverage)
    except (UserError, ValueError) as e:
        sys.exit(f"error: {e}")
    except OSError as e:
        sys.exit(f"error: --out {args.out}: {e.strerror}")
    print(f"wrote {args.out}.model ({tok.vocab_size} pieces)")


if __name__ == "__main__":
    from data import run

    run(main)
