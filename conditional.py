"""Class-conditional generation: lines that start with a label, generated per label by holding the
label as context (a prefix), with and without classifier-free guidance.

    python conditional.py build --corpus ../shared/data/e2e/train.txt --out runs/area/train.txt
    python train.py --corpus runs/area/train.txt --out runs/area --preset small --max-minutes 10 --vocab-size 2000
    python conditional.py measure --ckpt runs/area/ckpt.pt --guidance 0 1 1.5 2 3 --steps 20

`build` labels E2E restaurant descriptions by the area they name: `<riverside>` or `<centre>` (lines
naming both or neither are left out). The area is stated in plain words, so whether a sample carries
its label's property can be checked without a classifier's own errors (family-friendliness, the
other obvious property, is often negated: "not kid friendly"). `measure` samples --num-samples texts
per label and guidance weight and reports the share that name their label's area, the other area, or
neither. Any labelled corpus works the same way with `sample.py --prefix "<label>" --guidance W`.
"""
import argparse
import math
import os
import re
import sys

import checkpoint
from data import UserError, read_lines, run, seed_arg
from device import set_threads
from diffusion import DiffusionConfig
from sample import generate

# label -> what a line with that property says
LABELS = {"<riverside>": re.compile(r"\briver ?side\b|\bby the river\b", re.I),
          "<centre>": re.compile(r"\b(city )?cent(re|er)\b", re.I)}


def properties(text: str) -> set[str]:
    """The labels whose property the text states."""
    return {label for label, pattern in LABELS.items() if pattern.search(text)}


def build(lines: list[str]) -> list[str]:
    """'LABEL line' for each line that states exactly one label's property."""
    out = []
    for line in lines:
        found = properties(line)
        if len(found) == 1:
            out.append(f"{found.pop()} {line}")
    return out


def measure(diffusion, tok, guidance: float, num_samples: int, steps=None, seed=0, lengths_from=None, sampler=None,
            spacing=None, temperature=None) -> dict:
    """For each label, the shares of samples that state its property, the other's, or none."""
    res = {}
    for k, label in enumerate(LABELS):
        texts = generate(diffusion, tok, prefix=label, num_samples=num_samples, steps=steps, seed=seed + k,
                         lengths_from=lengths_from, guidance=guidance, sampler=sampler, spacing=spacing,
                         temperature=temperature)
        found = [properties(t[len(label):]) for t in texts]  # the text after the label
        res[label] = {"own": sum(label in f for f in found) / len(texts),
                      "other": sum(bool(f - {label}) for f in found) / len(texts),
                      "none": sum(not f for f in found) / len(texts),
                      "example": texts[0]}
    res["own_mean"] = sum(res[label]["own"] for label in LABELS) / len(LABELS)
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: sys.exit(f"error: {message}")  # one line, no usage dump
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write the labelled corpus")
    b.add_argument("--corpus", required=True, help="E2E-style text, one description a line")
    b.add_argument("--out", required=True, help="the labelled corpus to write")
    m = sub.add_parser("measure", help="sample per label and guidance weight; report label adherence")
    m.add_argument("--ckpt", required=True, help="checkpoint trained on a corpus from `build`")
    m.add_argument("--guidance", type=float, nargs="+", default=[0, 1, 1.5, 2, 3], help="guidance weights to compare")
    m.add_argument("--num-samples", type=int, default=100, help="samples per label and weight")
    m.add_argument("--steps", type=int, help="denoising steps (default: the checkpoint's)")
    m.add_argument("--sampler", default=DiffusionConfig.sampler, help="update rule (a name in diffusion.SAMPLERS)")
    m.add_argument("--spacing", default="", help="step spacing (a name in diffusion.SPACINGS; default: the checkpoint's)")
    m.add_argument("--temperature", type=float, default=DiffusionConfig.temperature, help="interpolation temperature")
    m.add_argument("--seed", type=seed_arg, default=0, help="seed: the same seed gives the same samples")
    for sp in (b, m):
        sp.error = p.error
    a = p.parse_args(argv)
    set_threads()
    try:
        if a.command == "build":
            checkpoint.check_output("--out", a.out, (a.corpus,))
            lines = build(read_lines(a.corpus))
            if not lines:
                raise UserError(f"{a.corpus}: no line names exactly one of the areas {', '.join(LABELS)} stand for")
            try:
                os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
                with open(a.out, "w", encoding="utf-8") as f:
                    f.write("\n".join(lines) + "\n")
            except OSError as e:
                raise UserError(f"--out {a.out}: {e.strerror}") from None
            counts = {label: sum(line.startswith(label + " ") for line in lines) for label in LABELS}
            print(f"wrote {len(lines)} labelled lines to {a.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
            return
        if a.num_samples < 1 or (a.steps is not None and a.steps < 1):
            raise UserError("--num-samples and --steps must be at least 1")
        if not all(math.isfinite(w) for w in a.guidance) or not 0 < a.temperature < math.inf:
            raise UserError("--guidance must be finite and --temperature positive and finite")
        ckpt = checkpoint.load(a.ckpt)
        tok, _, diffusion = checkpoint.build(ckpt)
    except UserError as e:
        sys.exit(f"error: {e}")
    print(f"{'guidance':>8}  " + "  ".join(f"{label + ' own/other/none':>30}" for label in LABELS) + "  mean own")
    for w in a.guidance:
        try:
            r = measure(diffusion, tok, w, a.num_samples, a.steps, a.seed, ckpt.get("length_hist"), a.sampler, a.spacing or None,
                        a.temperature)
        except ValueError as e:  # an unknown sampler or spacing, a temperature that is not positive
            sys.exit(f"error: {e}")
        cells = [f"{r[label]['own']:.2f} / {r[label]['other']:.2f} / {r[label]['none']:.2f}" for label in LABELS]
        print(f"{w:>8g}  " + "  ".join(f"{c:>30}" for c in cells) + f"  {r['own_mean']:>8.3f}", flush=True)


if __name__ == "__main__":
    run(main)
