import os
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


def ctrl_c_in_a_script(args, wait=5.0):
    """Run `ARGS; echo went on` with bash, press Ctrl-C after `wait` seconds (SIGINT to the process
    group, as a terminal does) and return (returncode, stdout, stderr)."""
    p = subprocess.Popen(["bash", "-c", shlex.join(args) + "; echo went on"], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    time.sleep(wait)
    os.killpg(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=120)
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
