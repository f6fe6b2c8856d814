"""The results of `evaluate.py --json`: printed as a table, and two of them compared number by number
(`evaluate.py --compare BEFORE.json AFTER.json`). Plain JSON in, text out: no model needed."""
import json

from data import UserError


def load(path: str) -> dict:
    """A result file, checked to hold every number `compare` reads; a UserError names what is wrong."""
    try:
        with open(path) as f:
            r = json.load(f)
        numbers(r)
    except OSError as e:
        raise UserError(f"--compare {path}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"--compare {path}: not a result of evaluate.py --json ({type(e).__name__}: {e})") from None
    return r


def table(r) -> str:
    s, c, row = r["settings"], r["cost"], lambda label, *cells: f"  {label:<32}" + "".join(f"{v:>13}" for v in cells)
    draws = s.get("infill_candidates", 1)  # JSONs written before it: one draw
    out = [f"denoising: {s['num_lines']} held-out lines, no context, self-conditioning off",
           "  t" + " " * 30 + "".join(f"{t:>8}" for t in r["denoising"])]
    out += [f"  {k:<31}" + "".join(f"{v[k]:>8.3f}" for v in r["denoising"].values()) for k in ("mse", "ce", "acc")]
    out += [f"infilling: {s.get('infill_steps', s['steps'])} {s['sampler']} steps, {s.get('infill_spacing', s['spacing'])} spacing, "
            f"temperature {s.get('infill_temperature', s['temperature']):g}, guidance {s['guidance']:g}, "
            + (f"the consensus of {draws} draws" if draws > 1 else "one draw"),
            row("", "token acc", "exact lines")]
    for kind, label in (("span", "one span, 25-50% hidden"), ("scattered", "scattered, 15% hidden")):
        out.append(row(label, *(f"{r['infilling'][kind][k]:.3f}" for k in ("acc", "exact"))))
    o = r["open_gaps"]
    out += [f"gaps of open length: the same spans, each in a gap of up to all the room left, its length chosen by the model ({o['lines']} lines)",
            row("", "fills", "hidden spans")]
    for key in ("mean", "std", "p10", "p25", "p50", "p75", "p90"):
        out.append(row(f"length {key} (tokens)", *(f"{o[k][key]:.2f}" for k in ("fill_length", "true_length"))))
    out += [row("length: mean absolute difference", f"{o['length_mad']:.2f}"),
            row("  the same, guessing the median", f"{o['length_mad_median']:.2f}"),
            row("length: correlation", f"{o['length_corr']:.3f}"),
            row("aligned token accuracy", f"{o['aligned_acc']:.3f}"), row("exact fills", f"{o['exact']:.3f}")]
    out += [f"samples: {s['num_samples']} unconditional ({s['steps']} {s['sampler']} steps, {s['spacing']} spacing, "
            f"temperature {s['temperature']:g}), beside the held-out lines", row("", "samples", "held-out")]
    for key, label, spec in (("judge_ppl", "judge perplexity", ".2f"), ("entropy", "unigram entropy (nats)", ".3f"),
                             ("distinct_2", "distinct-2", ".3f"), ("copied", "copied from training", ".3f"),
                             ("length_mean", "length mean (tokens)", ".2f"), ("length_std", "length std", ".2f")):
        out.append(row(label, *("-" if r[k][key] is None else format(r[k][key], spec) for k in ("samples", "held_out"))))
    out += [f"cost: batches of {c['batch_size']}", row("seconds per sample", f"{c['seconds_per_sample']:.4f}"),
            row("network evaluations per sample", c["evals_per_sample"])]
    if "seconds_per_fill" in c:  # JSONs written before it: samples only
        out += [row("seconds per filled line", f"{c['seconds_per_fill']:.4f}"),
                row("network evaluations per fill", c["evals_per_fill"])]
    return "\n".join(out)


def numbers(r) -> list:
    """(name, value, goal, reference) for every number of a result: goal "low", "high" or "near"
    (the reference: the held-out lines' own value)."""
    out = [(f"denoising t={t} {k}", v[k], "high" if k == "acc" else "low", None)
           for t, v in r["denoising"].items() for k in ("mse", "ce", "acc")]
    out += [(f"infilling {kind} {k}", v[k], "high", None) for kind, v in r["infilling"].items() for k in ("acc", "exact")]
    if "open_gaps" in r:
        o = r["open_gaps"]
        out += [("open gaps length mad", o["length_mad"], "low", None), ("open gaps length corr", o["length_corr"], "high", None),
                ("open gaps aligned acc", o["aligned_acc"], "high", None), ("open gaps exact", o["exact"], "high", None)]
    for k in ("judge_ppl", "entropy", "distinct_2", "copied", "length_mean", "length_std"):
        if r["samples"][k] is not None:
            goal = {"judge_ppl": "low", "copied": "low"}.get(k, "near")
            out.append((f"samples {k}", r["samples"][k], goal, r["held_out"][k]))
    out += [(f"cost {k}", r["cost"][k], "low", None)
            for k in ("seconds_per_sample", "evals_per_sample", "seconds_per_fill", "evals_per_fill") if k in r["cost"]]
    return out


def compare(before, after, tolerance=5e-4) -> str:
    """Every number of two results (evaluate.py --json) side by side, marked better or worse: closer
    to the held-out lines' value where that is the goal. Differences within `tolerance` are even."""
    rows, theirs = [], {name: v for name, v, _, _ in numbers(after)}
    mine = numbers(before)
    for name, b, goal, ref in mine:
        if name not in theirs:  # e.g. a judge's perplexity, measured on one side only
            rows.append(f"  {name:<40}{b:>12.4g}{'-':>12}  only before")
            continue
        a = theirs[name]
        gain = {"low": b - a, "high": a - b}.get(goal, abs(b - (ref or 0)) - abs(a - (ref or 0)))
        verdict = "even" if abs(gain) <= tolerance * max(1.0, abs(b)) else "better" if gain > 0 else "WORSE"
        rows.append(f"  {name:<40}{b:>12.4g}{a:>12.4g}  {verdict}")
    ours = {m[0] for m in mine}
    rows += [f"  {name:<40}{'-':>12}{a:>12.4g}  only after" for name, a in theirs.items() if name not in ours]
    return "\n".join([f"  {'':<40}{'before':>12}{'after':>12}"] + rows)
