"""evaluate.py and judge.py: the metrics on known answers, a judge that learns, the command end to end."""
import json
import math
import os
import random
import signal
import subprocess
import sys

import pytest
import torch

import checkpoint
import evaluate
import judge
from conftest import ROOT, SENTENCES, ctrl_c_in_a_script
from data import Corpus
from evaluate import aligned_accuracy, copied_share, distinct_n, edit_distance, fill_accuracy, hide, spread, unigram_entropy
from judge import CausalLM, perplexity
from model import get_preset
from tokenizer import train_tokenizer
from train import TrainConfig, train


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and lose much when another job holds the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_unigram_entropy():
    assert unigram_entropy([[5, 6], [7, 8]]) == pytest.approx(math.log(4))  # uniform over 4 tokens
    assert unigram_entropy([[4, 4], [5], [6]]) == pytest.approx(1.5 * math.log(2))  # p = 1/2, 1/4, 1/4
    assert unigram_entropy([[9, 9, 9]]) == 0.0
    assert unigram_entropy([]) == 0.0


def test_distinct_n():
    texts = ["a b a b", "a b c"]  # bigrams: ab ba ab | ab bc -> 3 unique of 5
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)
    assert distinct_n(["one"], 2) == 0.0


def test_fill_accuracy():
    target = torch.tensor([[5, 6, 7, 1], [8, 9, 1, 0]])
    pred = torch.tensor([[99, 0, 7, 1], [8, 9, 1, 0]])  # row 0: a given token differs (ignored), one fill wrong
    hidden = torch.tensor([[False, True, True, False], [True, True, False, False]])
    acc, exact = fill_accuracy(pred, target, hidden)
    assert acc == pytest.approx(3 / 4) and exact == pytest.approx(1 / 2)
    acc, exact = fill_accuracy(target, target, hidden)
    assert acc == 1.0 and exact == 1.0


def test_edit_distance_and_aligned_accuracy():
    assert edit_distance("kitten", "sitting") == 3 and edit_distance([], [1, 2]) == 2 and edit_distance([1], [1]) == 0
    assert aligned_accuracy([5, 6, 7], [5, 6, 7]) == 1.0
    assert aligned_accuracy([5, 7], [5, 6, 7]) == pytest.approx(2 / 3)  # one token left out
    assert aligned_accuracy([5, 6, 7, 8, 9, 10], [5, 6, 7]) == pytest.approx(1 / 2)  # three too many
    assert aligned_accuracy([], []) == 1.0
    s = spread([1, 2, 3, 4, 5])
    assert s["mean"] == 3 and s["p50"] == 3 and s["p10"] < s["p25"] < s["p50"] < s["p75"] < s["p90"]


def test_compare_marks_better_and_worse(tmp_path, capsys):
    def result(span, ppl, entropy):
        return {"denoising": {"0.5": {"mse": 0.1, "ce": 0.2, "acc": 0.9}},
                "infilling": {"span": {"acc": span, "exact": 0.0}},
                "samples": {"judge_ppl": ppl, "entropy": entropy, "distinct_2": 0.5, "copied": 0.0, "length_mean": 20, "length_std": 5},
                "held_out": {"judge_ppl": 5.0, "entropy": 4.0, "distinct_2": 0.3, "copied": 0.0, "length_mean": 20, "length_std": 6},
                "cost": {"seconds_per_sample": 0.1, "evals_per_sample": 20}}
    before, after = result(0.2, 100.0, 3.5), result(0.3, 150.0, 4.2)  # entropy: 0.5 from held-out, then 0.2
    lines = {line.split("  ")[1].strip(): line.split()[-1] for line in evaluate.compare(before, after).splitlines()[1:]}
    assert lines["infilling span acc"] == "better" and lines["samples judge_ppl"] == "WORSE"
    assert lines["samples entropy"] == "better" and lines["denoising t=0.5 acc"] == "even"
    unjudged = result(0.3, None, 4.2)  # evaluate.py without --judge
    for (a, b), side in ((before, unjudged), "before"), ((unjudged, before), "after"):
        row = [line for line in evaluate.compare(a, b).splitlines() if "judge_ppl" in line]
        assert len(row) == 1 and row[0].split()[-2:] == ["only", side]
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, r in zip(paths, (before, after)):
        path.write_text(json.dumps(r))
    evaluate.main(["--compare", *map(str, paths)])
    assert "WORSE" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="error: --compare"):
        evaluate.main(["--compare", str(paths[0]), str(tmp_path / "missing.json")])


def test_copied_share():
    assert copied_share(["a b", "c d", "a b"], {"a b", "x y"}) == pytest.approx(2 / 3)
    assert copied_share([], {"a"}) == 0.0


def test_hidden_masks():
    gen = torch.Generator().manual_seed(0)
    for n in (2, 5, 12, 40, 64):
        span = hide("span", n, gen)
        k = int(span.sum())
        where = span.nonzero().flatten()
        assert not span[-1] and k >= 1 and where[-1] - where[0] + 1 == k  # one contiguous run, EOS given
        assert 0.25 * (n - 1) - 0.5 <= k <= max(1, 0.5 * (n - 1) + 0.5)
        scattered = hide("scattered", n, gen)
        assert not scattered[-1] and int(scattered.sum()) == max(1, round(0.15 * (n - 1)))
    with pytest.raises(ValueError, match="span, scattered"):
        hide("middle", 5, gen)


@pytest.fixture(scope="module")
def judged(tok):
    """(perplexity before training, a tiny judge trained 100 steps on the 16 sentences)."""
    cfg = get_preset("tiny")
    cfg.vocab_size, cfg.max_len = tok.vocab_size, 64
    torch.manual_seed(0)
    lm = CausalLM(cfg)
    before = perplexity(lm, tok, SENTENCES)
    judge.fit(lm, Corpus(SENTENCES, tok, cfg.max_len), max_steps=100, batch_size=16, lr=3e-3, warmup=10)
    return before, lm


def test_judge_perplexity_falls_with_training(judged, tok):
    before, lm = judged
    after = perplexity(lm, tok, SENTENCES)
    assert before > 0.5 * tok.vocab_size  # untrained: close to uniform over the vocabulary
    assert after < before / 10, (before, after)
    assert perplexity(lm, tok, SENTENCES, batch_size=3) == pytest.approx(after, rel=1e-6)  # batching is neutral
    assert perplexity(lm, tok, SENTENCES) == after  # deterministic


def test_judge_prefers_real_to_shuffled(judged, tok):
    _, lm = judged
    rng, shuffled = random.Random(0), []
    for s in SENTENCES:
        words = s.split()
        while words == s.split():
            rng.shuffle(words)
        shuffled.append(" ".join(words))
    assert 2 * perplexity(lm, tok, SENTENCES) < perplexity(lm, tok, shuffled)


def test_judge_is_causal(judged, tok):
    _, lm = judged
    ids = torch.tensor([tok.encode(SENTENCES[0]) + [1]])
    changed = ids.clone()
    changed[0, -3:] = 5
    with torch.no_grad():
        assert torch.equal(lm(ids)[:, :-3], lm(changed)[:, :-3])  # no position sees the ones after it


@pytest.fixture(scope="module")
def run_dir(corpus_file, tok, tmp_path_factory):
    """A tiny diffusion checkpoint (5 steps) and a judge for it written by judge.py's command."""
    d = tmp_path_factory.mktemp("evaluate")
    (d / "tok.model").write_bytes(tok.model_bytes)
    train(TrainConfig(corpus=corpus_file, tokenizer=str(d / "tok.model"), out=str(d / "out"), preset="tiny",
                      batch_size=8, max_steps=5, eval_every=100, threads=1), quiet=True)
    judge.main(["--corpus", corpus_file, "--ckpt", str(d / "out" / "ckpt.pt"), "--out", str(d / "judge.pt"),
                "--preset", "tiny", "--max-steps", "5", "--batch-size", "8", "--threads", "1"])
    return d


@pytest.mark.skipif(os.name != "posix", reason="a shell script and signals as on POSIX")
def test_ctrl_c_saves_the_judge_and_stops_the_script(run_dir, corpus_file, tmp_path):
    """judge.py, as train.py: Ctrl-C saves the judge as it is, then ends as Ctrl-C would."""
    rc, out, err = ctrl_c_in_a_script([sys.executable, "judge.py", "--corpus", corpus_file, "--ckpt",
                                       str(run_dir / "out" / "ckpt.pt"), "--out", str(tmp_path / "judge.pt"),
                                       "--preset", "tiny", "--max-steps", "10000000", "--batch-size", "8"])
    assert "Traceback" not in err and "went on" not in out and rc == -signal.SIGINT, (rc, err)
    state = torch.load(tmp_path / "judge.pt", weights_only=True)
    assert state["kind"] == "judge" and 0 < state["step"] < 10000000
    assert f"after {state['step']} steps" in out  # its last line, printed before it ends


def test_judge_file_loads_safely(run_dir, tok):
    state = torch.load(run_dir / "judge.pt", weights_only=True)
    assert state["kind"] == "judge" and state["step"] == 5 and state["tokenizer"] == tok.model_bytes
    judge_tok, lm = judge.load_judge(str(run_dir / "judge.pt"))
    assert judge_tok.model_bytes == tok.model_bytes and math.isfinite(perplexity(lm, tok, SENTENCES[:3]))


def test_denoising_leaves_the_config_alone(run_dir, tok):
    _, _, diffusion = checkpoint.build(checkpoint.load(str(run_dir / "out" / "ckpt.pt")))
    corpus = Corpus(SENTENCES[:5], tok, diffusion.model.cfg.max_len)
    first = evaluate.denoising(diffusion, corpus, batch_size=2)
    assert diffusion.cfg.self_cond_rate == 0.5  # self-conditioning was off on a copy only
    assert first == evaluate.denoising(diffusion, corpus, batch_size=2)  # seeded: the same numbers
    assert list(first) == ["0.1", "0.3", "0.5", "0.7", "0.9"] and all(0 <= v["acc"] <= 1 for v in first.values())
    diffusion.cfg.expected = True  # trained to score the expected embedding: still the output's mse
    assert evaluate.denoising(diffusion, corpus, batch_size=2) == first and diffusion.cfg.expected


def test_fills_and_samples_get_their_own_settings(run_dir, tok):
    """Infilling and open gaps sample with their own steps and temperature and the checkpoint's
    infill_spacing and infill_candidates (its infill_* settings when infilling() is called alone),
    unconditional samples with theirs, its spacing and one candidate."""
    _, _, diffusion = checkpoint.build(checkpoint.load(str(run_dir / "out" / "ckpt.pt")))
    assert diffusion.warp is not None  # every training run keeps its time warp
    diffusion.cfg.spacing, diffusion.cfg.infill_spacing, diffusion.cfg.infill_candidates = "warped", "sqrt", 3
    used, sample = [], diffusion.sample
    diffusion.sample = lambda *a, **kw: used.append((kw["steps"], kw["spacing"], kw["temperature"],
                                                     kw["candidates"])) or sample(*a, **kw)
    r = evaluate.evaluate(diffusion, tok, SENTENCES[:4], num_lines=4, num_samples=2, steps=3, temperature=0.7,
                          infill_temperature=0.4, infill_steps=2)
    # one batch each, in order: span and scattered infilling, open gaps, samples
    assert used == [(2, "sqrt", 0.4, 3)] * 3 + [(3, "warped", 0.7, 1)]
    assert r["settings"]["infill_candidates"] == 3
    used.clear()
    diffusion.cfg.infill_steps = 4
    corpus = Corpus(SENTENCES[:4], tok, diffusion.model.cfg.max_len)
    evaluate.infilling(diffusion, corpus, "span", None, "ddpm")
    evaluate.infilling(diffusion, corpus, "span", None, "ddpm", candidates=2)
    assert used == [(4, "sqrt", diffusion.cfg.infill_temperature, 3), (4, "sqrt", diffusion.cfg.infill_temperature, 2)]


def test_evaluate_end_to_end_twice(run_dir, corpus_file, capsys):
    args = ["--ckpt", str(run_dir / "out" / "ckpt.pt"), "--valid", corpus_file, "--judge", str(run_dir / "judge.pt"),
            "--num-lines", "6", "--num-samples", "5", "--steps", "3", "--infill-steps", "3", "--batch-size", "4",
            "--threads", "1"]
    results = []
    for name in ("a.json", "b.json"):
        evaluate.main(args + ["--json", str(run_dir / name)])
        results.append(json.loads((run_dir / name).read_text()))
    for r in results:
        assert r["cost"].pop("seconds_per_sample") > 0 and r["cost"].pop("seconds_per_fill") > 0  # the only numbers that may change
    a, b = results
    assert a == b
    assert list(a["denoising"]) == ["0.1", "0.3", "0.5", "0.7", "0.9"]
    assert all(0 <= a["infilling"][k][m] <= 1 for k in ("span", "scattered") for m in ("acc", "exact"))
    o = a["open_gaps"]  # the spans of "span" again, each in a gap of all the room the model has
    assert o["lines"] == 6 and 0 <= o["aligned_acc"] <= 1 and o["length_mad"] >= 0
    assert o["true_length"]["mean"] <= o["fill_length"]["mean"] + o["length_mad"] + 1e-9
    assert 0 <= o["length_mad_median"] <= o["true_length"]["std"] + 1e-9  # the median minimises it; below the std
    assert a["samples"]["judge_ppl"] > 1 and a["held_out"]["judge_ppl"] > 1
    assert a["samples"]["copied"] is not None  # the checkpoint's training corpus was found
    assert a["held_out"]["copied"] == 1.0  # --valid is the training corpus here
    assert a["cost"]["evals_per_sample"] == 3 and a["settings"]["num_lines"] == 6 and len(a["examples"]) == 5
    assert a["cost"]["evals_per_fill"] == 3 * a["settings"]["infill_candidates"]  # each draw of a fill takes its steps
    out = capsys.readouterr().out
    assert "denoising" in out and "judge perplexity" in out and "network evaluations per fill" in out


def test_sampling_settings_default_to_the_checkpoints(run_dir, corpus_file, tmp_path):
    """Without --steps and --temperature (and their --infill-* twins) a checkpoint is evaluated as it
    samples, with its own settings, not this code's defaults: older JSONs stay reproducible."""
    ckpt = checkpoint.load(str(run_dir / "out" / "ckpt.pt"))
    ckpt["diffusion_config"].update(steps=4, temperature=0.7, infill_steps=3, infill_temperature=0.6)
    checkpoint.save(str(tmp_path / "older.pt"), **ckpt)
    evaluate.main(["--ckpt", str(tmp_path / "older.pt"), "--valid", corpus_file, "--num-lines", "4", "--num-samples", "2",
                   "--batch-size", "4", "--threads", "1", "--json", str(tmp_path / "r.json")])
    s = json.loads((tmp_path / "r.json").read_text())["settings"]
    assert (s["steps"], s["temperature"], s["infill_steps"], s["infill_temperature"]) == (4, 0.7, 3, 0.6)


def test_user_mistakes(run_dir, corpus_file, tmp_path):
    ckpt, good_judge = str(run_dir / "out" / "ckpt.pt"), str(run_dir / "judge.pt")
    other = train_tokenizer(SENTENCES, 120, str(tmp_path / "other"))
    cfg = get_preset("tiny")
    cfg.vocab_size, cfg.max_len = other.vocab_size, 64
    judge.save_judge(str(tmp_path / "other.pt"), CausalLM(cfg), other)
    p = subprocess.run([sys.executable, "evaluate.py", "--ckpt", ckpt, "--valid", corpus_file, "--judge",
                        str(tmp_path / "other.pt")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    err = p.stderr.strip()
    assert p.returncode != 0 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("error:") and "another tokenizer" in err
    for args, words in [(["--valid", str(tmp_path / "none.txt")], "no such file"),
                        (["--valid", corpus_file, "--judge", ckpt], "not a judge"),
                        (["--valid", corpus_file, "--judge", str(tmp_path / "none.pt")], "no such checkpoint"),
                        (["--valid", corpus_file, "--sampler", "euler"], "unknown sampler"),
                        (["--valid", corpus_file, "--infill-candidates", "0"], "--infill-candidates")]:
        with pytest.raises(SystemExit) as e:
            evaluate.main(["--ckpt", ckpt, *args])
        assert str(e.value.code).startswith("error:") and words in str(e.value.code), e.value.code
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--ckpt", good_judge, "--valid", corpus_file])
    assert "not a diffusion checkpoint" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        judge.main(["--corpus", corpus_file, "--ckpt", good_judge, "--out", str(tmp_path / "j.pt"), "--max-steps", "1"])
    assert "not a diffusion checkpoint" in str(e.value.code)
