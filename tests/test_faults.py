"""Crashes, kills, resumes, bad numbers and hostile input never lose work or end in a traceback."""
import os
import random
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings, strategies as st

import checkpoint
import train as train_mod
from conftest import PROGRESS, ROOT, ctrl_c_in_a_script, read_until
from data import UserError
from timewarp import TimeWarp
from sample import fill_template, parse_template
from train import TrainConfig, train


def config(corpus_file, tok_file, out, **kw):
    # one thread: with two, torch's CPU backward is, once in several runs, not bitwise repeatable
    base = dict(corpus=corpus_file, tokenizer=tok_file, out=str(out), preset="tiny", batch_size=8,
                max_steps=8, eval_every=1000, seed=3, threads=1)
    return TrainConfig(**{**base, **kw})


@pytest.fixture
def tok_file(tok, tmp_path):
    path = tmp_path / "tok.model"
    path.write_bytes(tok.model_bytes)
    return str(path)


def params(out):
    return torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["model"]


@pytest.mark.parametrize("kw", [{"time_draw": "uniform"}, {"time_draw": "warped", "open_rate": 0.5}])
def test_resume_is_exact(corpus_file, tok_file, tmp_path, kw):
    kw = {**kw, "ema": 0.9}
    train(config(corpus_file, tok_file, tmp_path / "a", **kw), quiet=True)
    train(config(corpus_file, tok_file, tmp_path / "b", stop_at_step=3, **kw), quiet=True)
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["step"] == 3
    train(config(corpus_file, tok_file, tmp_path / "b", **kw), quiet=True)
    a, b = (torch.load(p / "ckpt.pt", weights_only=True) for p in (tmp_path / "a", tmp_path / "b"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
        assert torch.equal(a["ema"][k], b["ema"][k]), k  # the moving average is resumed too
    assert any(not torch.equal(a["ema"][k], a["model"][k]) for k in a["model"])  # an average, not a copy
    # every run keeps the time warp (uniform draws too: it places the warped and restart sampling steps)
    assert torch.equal(a["time_warp"], b["time_warp"]) and not torch.equal(a["time_warp"], TimeWarp().loss)


def test_grad_accum_matches_one_batch(corpus_file, tok_file, tmp_path):
    train(config(corpus_file, tok_file, tmp_path / "a", max_steps=3), quiet=True)
    train(config(corpus_file, tok_file, tmp_path / "b", max_steps=3, grad_accum=4), quiet=True)
    a, b = params(tmp_path / "a"), params(tmp_path / "b")
    # sums in another order differ by ~1e-7, which Adam's normalisation makes ~2e-5 where gradients
    # are near 0; a wrong average over the pieces differs by an Adam step, ~1e-3
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4), k


def test_keep_last_checkpoints(corpus_file, tok_file, tmp_path):
    train(config(corpus_file, tok_file, tmp_path, max_steps=8, eval_every=2, keep=2), quiet=True)
    kept = sorted(f for f in os.listdir(tmp_path) if f.startswith("ckpt-"))
    assert kept == ["ckpt-00000006.pt", "ckpt-00000008.pt"]
    assert torch.load(tmp_path / kept[-1], weights_only=True)["step"] == 8


@pytest.mark.parametrize("log_every, caught", [(2, "by step 6"), (100, "by step 8")])  # by the log, by the save
def test_non_finite_loss_stops_and_keeps_last_checkpoint(corpus_file, tok_file, tmp_path, monkeypatch, log_every, caught):
    real = train_mod.train_step

    def poisoned(diffusion, batch, cfg, step, *rest):
        parts = real(diffusion, batch, cfg, step, *rest)
        if step >= 5:  # what a diverged step does: a loss and then weights that are not finite
            parts["loss"] = parts["loss"] * float("nan")
            with torch.no_grad():
                next(diffusion.model.parameters()).fill_(float("nan"))
        return parts

    monkeypatch.setattr(train_mod, "train_step", poisoned)
    with pytest.raises(UserError, match=f"{caught}; stopped: the last good checkpoint stays in"):
        train(config(corpus_file, tok_file, tmp_path, max_steps=20, eval_every=4, log_every=log_every), quiet=True)
    ckpt = checkpoint.load(str(tmp_path / "ckpt.pt"))
    assert ckpt["step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_a_run_without_keep_leaves_kept_checkpoints_alone(corpus_file, tok_file, tmp_path):
    train(config(corpus_file, tok_file, tmp_path, max_steps=4, eval_every=2, keep=2), quiet=True)
    train(config(corpus_file, tok_file, tmp_path, max_steps=6, eval_every=2), quiet=True)  # resumed, keep=1
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("ckpt-")) == ["ckpt-00000002.pt", "ckpt-00000004.pt"]
    assert checkpoint.load(str(tmp_path / "ckpt.pt"))["step"] == 6


def test_full_disk_is_reported_before_training(corpus_file, tok_file, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: SimpleNamespace(total=10**9, used=10**9, free=1000))
    with pytest.raises(UserError, match="MiB free"):
        train(config(corpus_file, tok_file, tmp_path), quiet=True)
    assert not os.path.exists(tmp_path / "ckpt.pt")


def test_kill_9_never_leaves_a_broken_checkpoint(corpus_file, tok_file, tmp_path):
    args = [sys.executable, "train.py", "--corpus", corpus_file, "--tokenizer", tok_file, "--out", str(tmp_path),
            "--preset", "tiny", "--batch-size", "8", "--max-steps", "100000", "--eval-every", "3"]
    rng = random.Random(0)
    last = 0
    for _ in range(5):
        p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(2.0, 5.0))
        p.send_signal(signal.SIGKILL)
        p.wait()
        if os.path.exists(tmp_path / "ckpt.pt"):
            step = checkpoint.load(str(tmp_path / "ckpt.pt"))["step"]  # loads: never half written
            assert step >= last
            last = step
    assert last > 0
    p = subprocess.run(args[:-4] + ["--stop-at-step", str(last + 3), "--max-steps", "100000"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert f"resuming at step {last}" in p.stdout
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


@pytest.mark.skipif(os.name != "posix", reason="a shell script and signals as on POSIX")
def test_ctrl_c_saves_and_stops_the_script_that_ran_it(corpus_file, tok_file, tmp_path):
    """Ctrl-C while a shell script runs train.py and then another command: training saves where it is
    and ends as Ctrl-C would, so the script stops too (bash goes on after a child that exits, 0 or 130)."""
    args = [sys.executable, "train.py", "--corpus", corpus_file, "--tokenizer", tok_file, "--out", str(tmp_path),
            "--preset", "tiny", "--batch-size", "8", "--max-steps", "100000", "--eval-every", "100000"]
    rc, out, err = ctrl_c_in_a_script(args)
    assert "Traceback" not in err, err
    assert "went on" not in out and rc == -signal.SIGINT, (rc, err)
    assert "the same command resumes it" in out and "stopping: saving where it is" in err
    assert checkpoint.load(str(tmp_path / "ckpt.pt"))["step"] > 0  # no report before: Ctrl-C's save


@pytest.mark.parametrize("merged", [False, True])  # `| head`, `2>&1 | head`
def test_a_closed_stdout_saves_and_stops(corpus_file, tok_file, tmp_path, merged):
    """`train.py | head`: when the reader of stdout goes away, the run saves where it is and stops."""
    args = [sys.executable, "train.py", "--corpus", corpus_file, "--tokenizer", tok_file, "--out", str(tmp_path),
            "--preset", "tiny", "--batch-size", "8", "--max-steps", "100000", "--eval-every", "100000"]
    p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT if merged else subprocess.PIPE)
    assert re.search(PROGRESS.encode(), read_until(p)), "no progress"
    p.stdout.close()  # the reader has what it wanted
    err = "" if merged else p.stderr.read().decode()
    assert p.wait(timeout=120) == 0, err
    saved = checkpoint.load(str(tmp_path / "ckpt.pt"))["step"]  # no report, no checkpoint before: this one's
    assert saved > 0
    if not merged:
        assert "Traceback" not in err and "stdout was closed" in err, err
        assert saved == int(err.split("stopping at step ")[1].split(",")[0])


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_a_closed_terminal_saves_and_stops(corpus_file, tok_file, tmp_path):
    """The terminal that runs train.py is closed (a hang-up: SIGHUP, from the kernel and from the
    shell, and writes to it fail): the run saves where it is and ends as the hang-up would have."""
    master, slave = os.openpty()
    name = os.ttyname(slave)

    def own_terminal():  # a new session whose controlling terminal is the pseudo-terminal
        os.setsid()
        fd = os.open(name, os.O_RDWR)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    args = [sys.executable, "train.py", "--corpus", corpus_file, "--tokenizer", tok_file, "--out", str(tmp_path),
            "--preset", "tiny", "--batch-size", "8", "--max-steps", "100000", "--eval-every", "20"]
    p = subprocess.Popen(args, cwd=ROOT, stdin=subprocess.DEVNULL, preexec_fn=own_terminal)
    os.close(slave)
    seen = b""
    while b"sample:" not in seen:  # the first report: its checkpoint is at step 20
        try:
            seen += os.read(master, 4096)
        except OSError:  # the child is gone, the pseudo-terminal with it
            break
    assert b"sample:" in seen, seen[-2000:]
    time.sleep(2)
    os.close(master)
    p.send_signal(signal.SIGHUP)  # an interactive shell passes the hang-up on too: a second one must not kill
    assert p.wait(timeout=120) == -signal.SIGHUP
    assert checkpoint.load(str(tmp_path / "ckpt.pt"))["step"] > 20  # the steps since the report were saved


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no hang-ups here")
def test_nohup_keeps_running_on_a_hang_up():
    """Under nohup (SIGHUP ignored), training does not take the hang-up as a stop."""
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        flag = checkpoint.StopFlag()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        flag.release()
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        flag = checkpoint.StopFlag()
        assert signal.getsignal(signal.SIGHUP) == flag.handle
        flag.release()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, before)


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no hang-ups here")
def test_a_second_hang_up_does_not_kill(monkeypatch):
    """A closed terminal sends SIGHUP twice (the shell's, the kernel's), 1 ms apart: the second must
    not cut the save short, as a second Ctrl-C does."""
    def die_of(signum):  # in place of dying, which would end pytest
        raise SystemExit(128 + signum)
    monkeypatch.setattr(checkpoint, "quiet_terminal", lambda: None)  # keep pytest's own terminal
    monkeypatch.setattr(checkpoint, "die_of", die_of)
    flag = checkpoint.StopFlag()
    try:
        flag.handle(signal.SIGHUP, None)
        flag.handle(signal.SIGHUP, None)
        assert flag.stop
        with pytest.raises(SystemExit):
            flag.handle(signal.SIGINT, None)
    finally:
        flag.release()


def test_training_gives_the_signals_back(corpus_file, tok_file, tmp_path):
    """Ctrl-C after train() returns (demo.py's sampling) is Python's again, not the saving handler."""
    before = signal.getsignal(signal.SIGINT)
    train(config(corpus_file, tok_file, tmp_path, max_steps=2), quiet=True)
    assert signal.getsignal(signal.SIGINT) is before


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_fuzz_templates(tok, text):
    try:
        ids, cond, gaps, _ = parse_template(text, tok, max_len=64)
    except UserError as e:
        assert "\n" not in str(e)
        return
    assert len(ids) == len(cond) <= 64 and gaps
    fill_template(text, tok, ids, gaps)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(), max_size=2000))
def test_fuzz_tokenizer(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert isinstance(tok.decode(ids), str)


def test_huge_template(tok):
    with pytest.raises(UserError, match="at most"):
        parse_template("word " * 100_000 + "[gap]", tok, max_len=64)
    with pytest.raises(UserError, match="at most"):
        parse_template("[gap:99999999999999999999999]", tok, max_len=64)
    with pytest.raises(UserError, match="bad gap"):
        parse_template("[gap:²]", tok, max_len=64)


def test_a_failure_while_reporting_keeps_the_checkpoint(corpus_file, tok_file, tmp_path, monkeypatch):
    """Validation and samples come after the save: an error there must not cost the step's checkpoint."""
    def broken_report(*args, **kw):
        raise RuntimeError("sampling broke")

    monkeypatch.setattr(train_mod, "report", broken_report)
    out = tmp_path / "r"
    with pytest.raises(RuntimeError, match="sampling broke"):
        train(config(corpus_file, tok_file, out, eval_every=4))
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] == 4


def test_resuming_with_another_model_setting_is_refused(corpus_file, tok_file, tmp_path):
    out = tmp_path / "s"
    train(config(corpus_file, tok_file, out, max_steps=2), quiet=True)
    with pytest.raises(UserError, match="--schedule cosine"):
        train(config(corpus_file, tok_file, out, max_steps=4, schedule="sqrt"), quiet=True)
    with pytest.raises(UserError, match="--batch-size 8.*--grad-accum"):  # the data position would mean another thing
        train(config(corpus_file, tok_file, out, max_steps=4, batch_size=4), quiet=True)
    shorter = tmp_path / "shorter.txt"
    shorter.write_text("\n".join(open(corpus_file).read().splitlines()[:-5]) + "\n")
    with pytest.raises(UserError, match="other lines"):
        train(config(str(shorter), tok_file, out, max_steps=4), quiet=True)
    with pytest.raises(UserError, match="--seed 3"):  # the noise of every later step would differ
        train(config(corpus_file, tok_file, out, max_steps=4, seed=4, valid=corpus_file), quiet=True)
    with pytest.raises(UserError, match="--max-len 64; resuming with 32"):
        train(config(corpus_file, tok_file, out, max_steps=4, max_len=32), quiet=True)
    with pytest.raises(UserError, match="--expected False; resuming with True"):  # another loss
        train(config(corpus_file, tok_file, out, max_steps=4, expected=True), quiet=True)
    train(config(corpus_file, tok_file, out, max_steps=3, max_len=64, embed_dim=16), quiet=True)  # the preset's: the same
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] == 3


def test_a_judge_in_out_is_not_resumed(corpus_file, tok_file, tmp_path):
    (tmp_path / "j").mkdir()
    torch.save({"version": checkpoint.VERSION, "kind": "judge", "model": {}}, tmp_path / "j" / "ckpt.pt")
    with pytest.raises(UserError, match="not a checkpoint written by train.py"):
        train(config(corpus_file, tok_file, tmp_path / "j"), quiet=True)


def test_resuming_a_checkpoint_without_the_gap_length_head_is_refused(corpus_file, tok_file, tmp_path):
    train(config(corpus_file, tok_file, tmp_path / "a", max_steps=1), quiet=True)
    path = tmp_path / "a" / "ckpt.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if not k.startswith("gap_head.")}
    torch.save(ckpt, path)
    with pytest.raises(UserError, match="older version"):
        train(config(corpus_file, tok_file, tmp_path / "a", max_steps=2), quiet=True)


@pytest.mark.skipif(os.name != "posix", reason="signals as on POSIX")
def test_ctrl_c_outside_training_is_one_line_and_ends_as_ctrl_c():
    """Every script's Ctrl-C (sample.py, evaluate.py, ...): `interrupted`, no traceback, and the
    process ends as the signal would have, so a shell script running it stops too."""
    code = "from data import run\ndef main(): raise KeyboardInterrupt\nrun(main)"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.stderr == "interrupted\n" and p.returncode == -signal.SIGINT, (p.returncode, p.stderr)
