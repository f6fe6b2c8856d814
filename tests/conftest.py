import contextlib
import os
import re
import select
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(2)

from tokenizer import train_tokenizer  # noqa: E402


PROGRESS = r"\| *[1-9][0-9]*/[0-9]+ \["  # a progress bar past step 0


def read_until(p, pattern=PROGRESS, deadline_s=120) -> bytes:
    """What process `p` writes to its stdout pipe, until `pattern` shows in it or stdout ends."""
    seen, chunk, deadline = b"", b"-", time.monotonic() + deadline_s
    while chunk and not re.search(pattern.encode(), seen) and time.monotonic() < deadline:
        if select.select([p.stdout], [], [], 1)[0]:
            chunk = os.read(p.stdout.fileno(), 4096)  # b"": it ended first
            seen += chunk
    return seen


def ctrl_c_in_a_script(args):
    """Run `ARGS; echo went on` with bash, press Ctrl-C (SIGINT to its process group, as a terminal
    does) once its progress bar is past step 0, and return (returncode, stdout, stderr). Python's
    stdout is left buffered, as outside tests; stderr is read at the end (it holds a few notes)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    p = subprocess.Popen(["bash", "-c", shlex.join(args) + "; echo went on"], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env, start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # pytest run with it ignored
    try:
        seen = read_until(p)
        assert re.search(PROGRESS.encode(), seen), seen[-2000:]
        os.killpg(p.pid, signal.SIGINT)
        out, err = p.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)  # whatever is left, on a failure
    out, err = (seen + out).decode(errors="replace"), err.decode(errors="replace")
    return p.returncode, out, err


# Sixteen short sentences, each told apart by its words: a tiny model can memorise them.
SENTENCES = [
    "the red fox jumps over the lazy dog",
    "a small bird sings in the green tree",
    "my old car needs a new engine soon",
    "she reads a long book every night",
    "the cold river runs past the mill",
    "we bake fresh bread on sunday morning",
    "his brother plays the violin very well",
    "the tall ship sails across the sea",
    "our team won the final game today",
    "a black cat sleeps under the table",
    "the farmer grows corn and wheat here",
    "children draw pictures with bright chalk",
    "the museum opens at nine each day",
    "heavy rain fell on the quiet town",
    "he drinks hot tea with lemon and honey",
    "the garden is full of yellow flowers",
]


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tok"
    return train_tokenizer(SENTENCES, 200, str(out))
