"""Data: read a corpus of one example a line, tokenise it once, and serve batches.

A batch is a dict of three (B, L) tensors:
    ids          token ids; each text is followed by EOS, then PAD up to the batch's longest row
    length_mask  True on the text and its EOS; False on padding. Attention and the loss ignore padding.
    cond_mask    True where a token is given as context (fed clean, not in the loss); see `infill_masks`.
and, in training with an open rate, gap_length: > 0 at the marker of a gap of open length (open_gaps).

Rows of similar length are batched together, so little compute is spent on padding.
"""
import argparse
import ast
import contextlib
import errno
import os
import random
import re
import signal
import stat
import sys
import sysconfig

import torch

from tokenizer import EOS, PAD, UNK


class UserError(Exception):
    """A mistake the user can fix. The entry points print it as one line and exit non-zero."""


def seed_arg(text: str) -> int:
    """argparse type of --seed: seeds feed generators as (seed x a million + step), so keep them small."""
    if not (text.isascii() and text.isdigit()) or int(text) >= 2**32:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number from 0 to {2**32 - 1}")
    return int(text)


def threads_arg(text: str) -> int:
    """--threads: 0 (one per core) to 1024; far more threads than any machine has crash OpenMP."""
    if not (text.isascii() and text.isdigit()) or int(text) > 1024:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number from 0 (one per core) to 1024")
    return int(text)


def run(main):
    """Run a script's main(): Ctrl-C outside training's own handler ends in one line (and the process
    as Ctrl-C would), a reader of stdout that goes away (`| head`) ends it quietly, and text that
    stdout's encoding cannot hold (a cp1252 redirect on Windows) prints as '?'."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        die_of(signal.SIGINT)
    except BrokenPipeError:  # the reader has what it wanted
        quiet_stdout()


def die_of(signum: int):
    """End the process as signal `signum` would have, after its handler did what it had to: a shell
    script stops at a command that Ctrl-C ended, and goes on after one that exited, even with 130."""
    for f in (sys.stdout, sys.stderr):  # dying skips Python's own flush: the last lines would be lost in a log
        with contextlib.suppress(Exception):
            f.flush()
    signal.signal(signum, signal.SIG_DFL)
    if os.name == "posix":
        os.kill(os.getpid(), signum)
    sys.exit(128 + signum)


@contextlib.contextmanager
def stdout_may_close(then=None):
    """Around writes to stdout that work must go on after: if its reader has gone (`| head`) or its
    terminal was closed, later writes go nowhere and `then()` runs (training: save and stop)."""
    try:
        yield
    except OSError as e:  # a pipe's reader gone, or a terminal hung up (EIO) before its SIGHUP came
        if not isinstance(e, BrokenPipeError) and e.errno != errno.EIO:
            raise
        quiet_stdout()
        if then:
            then()


def to_devnull(fds):
    """Later writes to these file descriptors go nowhere."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in fds:
        os.dup2(devnull, fd)
    os.close(devnull)


def quiet_stdout():
    """After the reader of a pipe has gone, later writes go nowhere (stderr's too, when it is the same
    pipe: `2>&1 | head`), and Python's flush of stdout at exit raises no second error."""
    same = os.path.sameopenfile(sys.stdout.fileno(), sys.stderr.fileno())
    to_devnull([sys.stdout.fileno()] + [sys.stderr.fileno()] * same)


def quiet_terminal():
    """After a hang-up (the terminal was closed), writes to it would fail: stdout and stderr that
    went to it (a character device, not a file or a pipe) go nowhere from now on."""
    try:
        to_devnull([fd for fd in (1, 2) if stat.S_ISCHR(os.fstat(fd).st_mode)])  # stdout, stderr
    except OSError:  # a descriptor closed already, or none left: writes may fail, and are caught there
        pass


def read_lines(path: str) -> list[str]:
    """Non-empty, stripped lines of a UTF-8 file; a clear UserError for anything else."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except OSError as e:
        raise UserError(f"{path}: {e.strerror}") from None
    raw = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")  # any line ending
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path}, line {line}: not UTF-8 (byte {raw[e.start]:#04x}); "
                        f"convert it, for example with iconv -f latin1 -t utf-8") from None
    lines = [s.strip() for s in text.split("\n")]
    lines = [s for s in lines if s]
    if not lines:
        raise UserError(f"{path}: no text (the file is empty or only blank lines)")
    return lines


def split_valid(lines: list[str], share: float = 0.05, max_lines: int = 1000, seed: int = 0):
    """Hold out a fixed-seed share of the corpus (None if the corpus is too small to spare any)."""
    n = min(int(len(lines) * share), max_lines)
    if n < 1:
        return lines, None
    order = list(range(len(lines)))
    random.Random(seed).shuffle(order)
    held = set(order[:n])
    return [s for i, s in enumerate(lines) if i not in held], [lines[i] for i in sorted(held)]


class Corpus:
    """A corpus tokenised once: `self.ids[i]` is line i's ids, cropped to max_len - 1, then EOS."""

    def __init__(self, lines: list[str], tok, max_len: int):
        self.ids, self.cropped, self.longest = [], 0, 0  # longest: in tokens before cropping, EOS included
        self.unk = 0  # UNK tokens, for the note
        for line in lines:
            ids = tok.encode(line)
            self.longest = max(self.longest, len(ids) + 1)
            if len(ids) > max_len - 1:
                ids, self.cropped = ids[: max_len - 1], self.cropped + 1
            self.unk += ids.count(UNK)
            self.ids.append(ids + [EOS])
        self.lengths = torch.tensor([len(x) for x in self.ids])  # (N,)
        self.max_len = max_len
        # every line padded once, so that a batch is one indexing operation
        self.table = torch.full((len(self.ids), max(map(len, self.ids), default=1)), PAD, dtype=torch.long)  # (N, longest)
        for i, ids in enumerate(self.ids):
            self.table[i, : len(ids)] = torch.tensor(ids)

    def __len__(self):
        return len(self.ids)

    def notes(self, what: str = "lines", hint: str = ""):
        """A line on stderr if any line was cropped to the model's length, and one if more than 1% of
        the tokens are UNK (a tokenizer trained on another corpus or script)."""
        if self.cropped:
            print(f"note: {self.cropped} of {len(self)} {what} were longer than {self.max_len - 1} tokens and "
                  f"were cropped (the longest: {self.longest}, EOS included){hint}", file=sys.stderr)
        unk = self.unk / max(1, int(self.lengths.sum()))
        if unk > 0.01:
            print(f"note: {unk:.1%} of the tokens of the {what} are UNK: the tokenizer has no piece for their "
                  "characters (was it trained on another corpus?)", file=sys.stderr)

    def length_histogram(self) -> list[int]:
        """hist[n] = number of lines with n tokens (EOS included): the sampler draws lengths from it."""
        return torch.bincount(self.lengths, minlength=self.max_len + 1).tolist()

    def batch(self, indices, gen: torch.Generator | None = None, mask_mode: str = "mixture", mixture=None,
              open_rate: float = 0.0) -> dict:
        """Rows `indices`, padded to the longest of them, with context masks drawn from `mixture`
        (mask_mode "mixture") or no context at all (mask_mode "none"). With probability
        `open_rate` (mixture only) a row teaches the length of a gap instead (open_gaps), and the
        batch has a fourth tensor, gap_length."""
        indices = torch.as_tensor(indices)
        lengths = self.lengths[indices]  # (B,)
        L = int(lengths.max())
        ids = self.table[indices, :L]  # (B, L)
        length_mask = torch.arange(L)[None] < lengths[:, None]  # (B, L)
        if mask_mode == "none":
            cond_mask = torch.zeros_like(length_mask)
        else:
            cond_mask = infill_masks(lengths, L, gen, mixture)
        batch = {"ids": ids, "length_mask": length_mask, "cond_mask": cond_mask}
        if mask_mode != "none" and open_rate:
            batch["gap_length"] = torch.zeros_like(ids)
            rows = (torch.rand(len(indices), generator=gen) < open_rate).nonzero()[:, 0]
            for key, value in open_gaps(ids[rows], lengths[rows], gen).items():
                batch[key][rows] = value
        return batch


# The infilling mixture: what share of training rows get which kind of context. The rows with no
# context also make the network an unconditional one, which classifier-free guidance needs.
MASK_MIXTURE = {"none": 0.3, "prefix": 0.2, "spans": 0.3, "scattered": 0.2}


def mask_mixture(uncond_rate: float = MASK_MIXTURE["none"]) -> dict:
    """MASK_MIXTURE with `uncond_rate` of the rows given no context; the other kinds share the rest
    in their proportions."""
    if not 0 <= uncond_rate <= 1:
        raise ValueError(f"uncond_rate {uncond_rate} must be between 0 and 1")
    rest = 1 - MASK_MIXTURE["none"]
    return {k: uncond_rate if k == "none" else v * (1 - uncond_rate) / rest for k, v in MASK_MIXTURE.items()}


def infill_masks(lengths: torch.Tensor, L: int, gen: torch.Generator | None = None, mixture: dict | None = None):
    """(B, L) bool context masks for texts of `lengths` (B,) tokens (EOS included); each row's kind
    is drawn from `mixture` (default MASK_MIXTURE):
        none       no context: unconditional generation
        prefix     the first 1..n-1 tokens are given: continuation
        spans      1 to 3 contiguous spans, 10-90% of the text in all, are hidden: gap infilling
        scattered  each token is hidden with a probability drawn from 10-90%
    Positions past a row's length are never context; a text of one token gets none."""
    mixture = mixture or MASK_MIXTURE
    B = len(lengths)
    n = lengths[:, None]  # (B, 1)
    pos = torch.arange(L)[None]  # (1, L)
    inside = pos < n  # (B, L)
    kind = torch.multinomial(torch.tensor(list(mixture.values()), dtype=torch.float), B, replacement=True, generator=gen)  # (B,)
    u = torch.rand(B, 7, generator=gen)  # the uniform draws of each row
    k = 1 + (u[:, 0] * 3).long()  # (B,) number of spans
    span = ((0.1 + 0.8 * u[:, 1]) * lengths / k).round().clamp(min=1).long()  # (B,) tokens a span
    starts = (u[:, 2:5] * (n - span[:, None] + 1)).long()  # (B, 3); spans past the k-th are unused
    in_span = (pos[..., None] >= starts[:, None]) & (pos[..., None] < (starts + span[:, None])[:, None])  # (B, L, 3)
    hidden = (in_span & (torch.arange(3) < k[:, None])[:, None]).any(-1)  # (B, L)
    masks = {"none": torch.zeros_like(inside),
             "prefix": pos < 1 + (u[:, 5:6] * (n - 1)).long(),
             "spans": inside & ~hidden,
             "scattered": inside & (torch.rand(B, L, generator=gen) > 0.1 + 0.8 * u[:, 6:7])}
    chosen = torch.stack([masks[name] for name in mixture])[kind, torch.arange(B)]  # (B, L)
    return chosen & inside & (n >= 2)


def collapse_gaps(ids, lengths, start, k) -> dict:
    """Replace tokens start..start+k-1 of each row by one marker: a context position holding PAD,
    whose `gap_length` is k. No other context position ever holds PAD, so the model can tell a
    marker, and learns to read from the line around it how long the gap is (Denoiser.gap_head);
    [gap:..N] in sample.py asks it. ids (B, L) hold texts of `lengths` (B,) tokens; start, k are
    (B,). A row with k = 0 stays as it is, without a marker. Every position is context: the row
    teaches the length only."""
    cut = (k - 1).clamp(min=0)  # (B,) positions removed
    pos = torch.arange(ids.shape[1])[None]  # (1, L)
    src = torch.where(pos <= start[:, None], pos, pos + cut[:, None]).clamp(max=ids.shape[1] - 1)  # (B, L)
    length_mask = pos < (lengths - cut)[:, None]
    marker = (k > 0)[:, None] & (pos == start[:, None])
    return {"ids": torch.where(marker | ~length_mask, PAD, ids.gather(1, src)), "length_mask": length_mask,
            "cond_mask": length_mask.clone(), "gap_length": torch.where(marker, k[:, None], 0)}


def open_gaps(ids, lengths, gen=None) -> dict:
    """Rows that teach gaps of open length: one span of 25-50% of each row's text (EOS stays), as
    evaluate.py's span test hides, is collapsed to a marker (collapse_gaps). What the model learns
    to expect is this prior, a phrase of its line, and what the words around the marker tell it.
    With spans of 10-90%, a short context would mostly mean a long gap, and a model learns to
    expect less where more of the line is given; with 10-50%, the length of the context says
    little (correlation 0.13 with the span's on the E2E lines), and in 2,300 steps a model learnt
    only the spans' typical length, whatever the line."""
    u = torch.rand(2, len(lengths), generator=gen)
    m = lengths - 1  # text tokens, EOS not included
    k = torch.where(m > 0, ((0.25 + 0.25 * u[0]) * m).round().clamp(min=1), 0).long()
    start = (u[1] * (m - k + 1)).long()
    return collapse_gaps(ids, lengths, start, k)


class Batches:
    """Endless, resumable batches of similar-length rows.

    Each epoch shuffles the corpus with seed + epoch, sorts pools of 50 batches by length, cuts
    them into batches and shuffles the batch order. `state()` / `load_state()` give the position,
    so a resumed run sees exactly the batches the uninterrupted run would have seen."""

    def __init__(self, corpus: Corpus, batch_size: int, seed: int = 0, pool: int = 50, mixture: dict | None = None,
                 open_rate: float = 0.0):
        self.corpus, self.batch_size, self.seed, self.pool, self.mixture = corpus, batch_size, seed, pool, mixture
        self.open_rate = open_rate
        self.epoch, self.pos = 0, 0
        self._order = None

    def _epoch_order(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(len(self.corpus), generator=g)
        size = self.batch_size * self.pool
        batches = []
        for i in range(0, len(perm), size):
            chunk = perm[i: i + size]
            chunk = chunk[torch.argsort(self.corpus.lengths[chunk], stable=True)].tolist()
            batches += [chunk[j: j + self.batch_size] for j in range(0, len(chunk), self.batch_size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]

    def __iter__(self):
        while True:
            if self._order is None:
                self._order = self._epoch_order()
            if self.pos >= len(self._order):
                self.epoch, self.pos, self._order = self.epoch + 1, 0, None
                continue
            indices = self._order[self.pos]
            # the infilling masks of a batch depend only on (seed, epoch, position): exact resume
            g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch * 1_000_003 + self.pos)
            self.pos += 1
            yield self.corpus.batch(indices, g, mixture=self.mixture, open_rate=self.open_rate)

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state(self, state: dict):
        self.epoch, self.pos, self._order = state["epoch"], state["pos"], None


def stdlib_sentences(min_words: int = 4, max_words: int = 40) -> list[str]:
    """Sentences from the docstrings of Python's standard library, read with `ast` (nothing is
    imported, so no module runs). Every Python install has them: the demo's offline corpus."""
    root = sysconfig.get_paths()["stdlib"]
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "ensurepip", "turtledemo"}
    seen, out = set(), []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("."))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            for node in ast.walk(tree):
                if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                doc = ast.get_docstring(node)
                if not doc:
                    continue
                # a paragraph is one run of prose; drop code examples, tables and lists
                for para in re.split(r"\n\s*\n", doc):
                    if re.search(r">>>|::|\|  |^\s*[-*+] |={3}|-{3}", para, re.M):
                        continue
                    text = " ".join(para.split())
                    for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
                        words = s.split()
                        if (min_words <= len(words) <= max_words and s[0].isupper() and s[-1] in ".!?"
                                and s.isascii() and s not in seen):
                            seen.add(s)
                            out.append(s)
    return out
