"""The commands as a user runs them: tokenizer.py, train.py, sample.py, as subprocesses."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT


def run(*args, check=True):
    p = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed:\n{p.stderr}")
    return p


def one_line_error(p, *words):
    assert p.returncode != 0
    err = p.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error:") or "error:" in err, err
    for w in words:
        assert w in err, err


@pytest.fixture(scope="module")
def run_dir(corpus_file, tmp_path_factory):
    """tokenizer.py, then train.py for a few steps: the user's first two commands."""
    d = tmp_path_factory.mktemp("run")
    run("tokenizer.py", "--corpus", corpus_file, "--vocab-size", "150", "--out", str(d / "tok"))
    assert (d / "tok.model").exists()
    p = run("train.py", "--corpus", corpus_file, "--tokenizer", str(d / "tok.model"), "--out", str(d / "out"),
            "--preset", "tiny", "--max-steps", "6", "--eval-every", "3", "--batch-size", "8")
    assert "saved" in p.stdout
    return d


def test_sample_unconditional_and_infill(run_dir):
    ckpt = str(run_dir / "out" / "ckpt.pt")
    p = run("sample.py", "--ckpt", ckpt, "--num-samples", "3", "--steps", "4")
    assert len(p.stdout.strip("\n").split("\n")) == 3
    p = run("sample.py", "--ckpt", ckpt, "--template", "the red fox [gap:2] over the [gap] dog", "--steps", "4",
            "--num-samples", "2")
    lines = p.stdout.strip("\n").split("\n")
    assert len(lines) == 2
    for line in lines:
        assert line.startswith("the red fox ") and " over the " in line and line.endswith(" dog")
    again = run("sample.py", "--ckpt", ckpt, "--template", "the red fox [gap:2] over the [gap] dog", "--steps", "4",
                "--num-samples", "2")
    assert again.stdout == p.stdout  # same seed, same text
    p = run("sample.py", "--ckpt", ckpt, "--prefix", "the red fox", "--steps", "4", "--show-steps", "--num-samples", "1")
    assert "[step   1/4]" in p.stdout and p.stdout.strip().split("\n")[-1].startswith("the red fox")


def test_resume_continues_at_saved_step(run_dir, corpus_file):
    out = str(run_dir / "out")
    p = run("train.py", "--corpus", corpus_file, "--out", out, "--preset", "tiny", "--max-steps", "9",
            "--eval-every", "100", "--batch-size", "8")
    assert "resuming at step 6" in p.stdout and "at step 9" in p.stdout
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] == 9


def test_bad_corpus(tmp_path, corpus_file):
    one_line_error(run("train.py", "--corpus", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o"),
                       "--max-steps", "1", check=False), "no such file")
    (tmp_path / "empty.txt").write_text("")
    one_line_error(run("train.py", "--corpus", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "o"),
                       "--max-steps", "1", check=False), "no text")
    assert not (tmp_path / "o").exists()  # a mistake in the corpus leaves no empty --out behind
    (tmp_path / "bad.txt").write_bytes(b"fine\n\xff\xfe broken\n")
    one_line_error(run("tokenizer.py", "--corpus", str(tmp_path / "bad.txt"), "--out", str(tmp_path / "t"),
                       check=False), "not UTF-8")
    one_line_error(run("train.py", "--corpus", corpus_file, "--tokenizer", corpus_file, "--out",
                       str(tmp_path / "o"), "--max-steps", "1", check=False), "--tokenizer")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    one_line_error(run("train.py", "--corpus", corpus_file, "--out", str(blocker / "sub"), "--max-steps", "1",
                       check=False), "--out")


def test_bad_checkpoints_and_templates(run_dir, tmp_path):
    ckpt = str(run_dir / "out" / "ckpt.pt")
    one_line_error(run("sample.py", "--ckpt", str(tmp_path / "none.pt"), check=False), "no such checkpoint")
    (tmp_path / "text.pt").write_text("hello")
    one_line_error(run("sample.py", "--ckpt", str(tmp_path / "text.pt"), check=False), "not a checkpoint")
    state = torch.load(ckpt, weights_only=True)
    torch.save({**state, "version": 99}, tmp_path / "v99.pt")
    one_line_error(run("sample.py", "--ckpt", str(tmp_path / "v99.pt"), check=False), "version 99")
    torch.save({"version": 1, "kind": "judge", "model": {}}, tmp_path / "judge.pt")
    one_line_error(run("sample.py", "--ckpt", str(tmp_path / "judge.pt"), check=False), "not a checkpoint written by train.py")
    one_line_error(run("sample.py", "--ckpt", ckpt, "--template", "no gap here", check=False), "no gap")
    one_line_error(run("sample.py", "--ckpt", ckpt, "--template", "the [gap:500] dog", check=False), "at most")
    one_line_error(run("sample.py", "--ckpt", ckpt, "--length", "0", check=False), "--length")
    one_line_error(run("sample.py", "--ckpt", ckpt, "--length", "500", check=False), "--length")
    one_line_error(run("sample.py", "--ckpt", ckpt, "--steps", "0", check=False), "--steps")
    one_line_error(run("sample.py", "--ckpt", ckpt, "--candidates", "0", check=False), "--candidates")
    one_line_error(run("sample.py", "--ckpt", ckpt, "--sampler", "euler", check=False), "unknown sampler")
    one_line_error(run("sample.py", "--ckpt", str(run_dir / "tok.model"), check=False), "not a checkpoint")
    one_line_error(run("sample.py", "--ckpt", ckpt, "--candidates", "65", check=False), "--candidates")
    one_line_error(run("sample.py", "--ckpt", ckpt, "--temperature", "inf", check=False), "--temperature")
    one_line_error(run("sample.py", "--ckpt", ckpt, "--template", "the [gap] dog", "--length", "5", check=False), "--length")
    if not torch.cuda.is_available():
        one_line_error(run("sample.py", "--ckpt", ckpt, "--device", "cuda", check=False), "--device cuda")
    one_line_error(run("sample.py", "--ckpt", ckpt, "--device", "tpu", check=False), "--device tpu")
    one_line_error(run("sample.py", "--ckpt", ckpt, "--prefix", "the [gap:3] fox", check=False), "--template")
    one_line_error(run("sample.py", "--ckpt", ckpt, "--seed", str(2**64), check=False), "--seed")


def test_outputs_never_overwrite_inputs(run_dir, corpus_file, tmp_path):
    """--json of evaluate.py, --out of judge.py and of conditional.py build that name an input file
    end before any work, and the file is left as it was."""
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes((run_dir / "out" / "ckpt.pt").read_bytes())
    before = ckpt.read_bytes()
    one_line_error(run("evaluate.py", "--ckpt", str(ckpt), "--valid", corpus_file, "--json", str(ckpt), check=False),
                   "input")
    one_line_error(run("evaluate.py", "--ckpt", str(tmp_path), "--valid", corpus_file, "--json", str(ckpt), check=False),
                   "input")  # --ckpt the run's folder: its ckpt.pt
    one_line_error(run("judge.py", "--corpus", corpus_file, "--ckpt", str(ckpt), "--out", str(ckpt),
                       "--max-steps", "2", check=False), "input")
    one_line_error(run("judge.py", "--corpus", corpus_file, "--ckpt", str(ckpt), "--out", str(tmp_path),
                       "--max-steps", "2", check=False), "folder")
    assert ckpt.read_bytes() == before
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(open(corpus_file).read())
    one_line_error(run("conditional.py", "build", "--corpus", str(corpus), "--out", str(corpus), check=False), "input")
    assert corpus.read_text() == open(corpus_file).read()


def test_tokenizer_out_may_name_the_model_file(corpus_file, tmp_path):
    run("tokenizer.py", "--corpus", corpus_file, "--vocab-size", "150", "--out", str(tmp_path / "t.model"))
    assert sorted(os.listdir(tmp_path)) == ["t.model", "t.vocab"]
    one_line_error(run("tokenizer.py", "--corpus", corpus_file, "--out", str(tmp_path), check=False), "folder")
    one_line_error(run("tokenizer.py", "--corpus", corpus_file, "--vocab-size", "8", "--out", str(tmp_path / "v"),
                       check=False), "--vocab-size")  # in our words, not SentencePiece's (--character_coverage)


def test_run_folder_threads_and_odd_stdout(run_dir, tmp_path):
    """--ckpt may name the run's folder; --threads is bounded; a stdout that cannot encode the text
    gets '?' for what it cannot hold; --compare names the file it cannot read."""
    p = run("sample.py", "--ckpt", str(run_dir / "out"), "--num-samples", "2", "--steps", "2")
    assert len(p.stdout.strip("\n").split("\n")) == 2
    one_line_error(run("sample.py", "--ckpt", str(tmp_path), check=False), "folder")
    ckpt = str(run_dir / "out" / "ckpt.pt")
    one_line_error(run("sample.py", "--ckpt", ckpt, "--threads", "5000", check=False), "--threads")
    p = subprocess.run([sys.executable, "sample.py", "--ckpt", ckpt, "--template", "caf\u00e9 [gap:2] \u65e5\u672c",
                        "--steps", "2", "--num-samples", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    assert p.stdout.startswith("caf? ") and p.stdout.rstrip().endswith(" ??")
    (tmp_path / "bad.json").write_text("{}")
    one_line_error(run("evaluate.py", "--compare", str(tmp_path / "bad.json"), str(tmp_path / "bad.json"), check=False),
                   "bad.json", "not a result")
    one_line_error(run("evaluate.py", "--compare", str(tmp_path / "none.json"), str(tmp_path / "bad.json"), check=False),
                   "none.json")


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {Payload.target}",))


def test_pickled_code_is_refused(tmp_path):
    Payload.target = str(tmp_path / "pwned")
    torch.save({"version": 1, "model": Payload()}, tmp_path / "evil.pt")
    one_line_error(run("sample.py", "--ckpt", str(tmp_path / "evil.pt"), check=False), "refused")
    assert not (tmp_path / "pwned").exists()
