"""Generate text, or fill the gaps of a template, with a trained checkpoint.

    python sample.py --ckpt runs/demo/ckpt.pt --num-samples 4
    python sample.py --ckpt runs/demo/ckpt.pt --template "The [gap] is a pub near [gap:3]."
    python sample.py --ckpt runs/demo/ckpt.pt --prefix "The Eagle is" --show-steps

Template syntax: `[gap]` is a gap of --gap-length tokens (default 6), `[gap:N]` one of exactly N
tokens, `[gap:..N]` one of up to N tokens: the model first reads the rest of the line and chooses
how many (checkpoints trained with --open-rate above 0, the default, have learnt to), then fills
that many.
The text around the gaps is kept word for word (runs of spaces become one); the text ends where the
template ends. After a space a gap's fill starts a new word; right after text ("un[gap]", a prefix
in Chinese), the model's first piece tells whether it starts a word or glues on. Each result is
the consensus of --candidates draws (8 for templates in checkpoints trained now): the draw that
agrees with the others on the most tokens, so results for one template often agree; --candidates 1
gives varied ones. A prefix is continued as the template "PREFIX[gap:N]", N drawn from the training
lengths. One result a line.
"""
import argparse
import math
import re
import sys

import torch
from torch.nn.utils.rnn import pad_sequence

import checkpoint
from device import pick_device, set_threads
from data import UserError, run, seed_arg, threads_arg
from diffusion import SAMPLERS, SPACINGS
from tokenizer import EOS, PAD, UNK

GAP = re.compile(r"\[gap(?::([^\]]*))?\]")
MARKER = re.compile(r"\[\s*gap\b[^\]]*\]?", re.IGNORECASE)  # anything meant as a gap, well written or not


def parse_template(template: str, tok, max_len: int, gap_length: int = 6, open_lengths=None):
    """Template -> (ids, cond, gaps, up_to): token ids and a context flag for each position, EOS
    included, the (start, end) positions of each gap, and for each position the N of a gap of open
    length ([gap:..N]) that stands there, else 0. Gap positions hold PAD in `ids`, False in `cond`.
    A gap of open length is one marker (a context position holding PAD, data.collapse_gaps) whose
    length the model tells (Diffusion.gap_lengths); or, given `open_lengths` (an iterator), a gap
    of the next of them."""
    stray = MARKER.search(GAP.sub("", template))
    if stray:
        raise UserError(f"bad gap {stray[0][:40]!r} in template: write [gap], [gap:N] or [gap:..N], closed by ]")
    ids, cond, pos, gaps, up_to = [], [], 0, [], []
    for m in GAP.finditer(template):
        text = template[pos: m.start()].strip()
        if text:
            piece = encode_context(tok, template, pos, text)
            ids += piece
            cond += [True] * len(piece)
            up_to += [0] * len(piece)
        size = re.fullmatch(r"(\.\.)?([0-9]+)", m.group(1).strip()) if m.group(1) is not None else None
        if m.group(1) is not None and (size is None or int(size[2]) < 1):
            raise UserError(f"bad gap {m.group(0)!r} in template: write [gap], [gap:N] or [gap:..N] with N a whole number from 1")
        open_, n = (bool(size[1]), size[2]) if size else (False, gap_length)
        if int(n) > max_len - 1:  # and the EOS
            raise UserError(f"gap {m.group(0)!r} is longer than the model takes: at most {max_len - 1} tokens")
        n, marker = int(n), open_ and open_lengths is None
        n = 1 if marker else next(open_lengths) if open_ else n
        gaps.append((len(ids), len(ids) + n))
        ids += [PAD] * n
        cond += [marker] * n
        up_to += [int(size[2]) if marker else 0] * n
        pos = m.end()
    if not gaps:
        raise UserError(f"template {template.strip()[:60]!r} has no gap: mark where text goes with [gap] or [gap:N]")
    text = template[pos:].strip()
    if text:
        piece = encode_context(tok, template, pos, text)
        ids += piece
        cond += [True] * len(piece)
        up_to += [0] * len(piece)
    ids.append(EOS)
    cond.append(True)
    up_to.append(0)
    need = len(ids) + sum(n - 1 for n in up_to if n)  # a gap of open length may take all its N
    if need > max_len:
        raise UserError(f"template {template.strip()[:60]!r} needs {need} tokens (EOS included) but the model takes at most "
                        f"{max_len}; shorten it or its gaps")
    return ids, cond, gaps, up_to


def encode_context(tok, template: str, pos: int, text: str) -> list[int]:
    """The ids of `text`, the template's words from `pos`, as they tokenise within the whole line.
    SentencePiece marks the start of every text it encodes as the start of a word ("▁"); right after
    a gap with no space between ("[gap], a", "[gap]s", Chinese or Japanese), the line has no word
    start there, so the mark goes: a lone "▁" piece is dropped, "▁s" becomes "s" where that is a piece."""
    ids = tok.encode(text)
    if pos == 0 or template[pos: pos + 1].isspace() or not ids:
        return ids
    first = tok.piece(ids[0])
    if first == "\u2581":
        return ids[1:]
    if first.startswith("\u2581") and tok.sp.piece_to_id(first[1:]) != UNK:
        return [tok.sp.piece_to_id(first[1:])] + ids[1:]
    return ids


def fill_template(template: str, tok, ids, gaps) -> str:
    """The template with each gap replaced by the decoded tokens the model put there. Each fill is
    decoded on its own, so it cannot glue onto the words after it; the template's own spacing stays,
    and the spaces around an empty fill become one. Where the template has no space before a gap
    (a prefix in Chinese, "un[gap]", two gaps side by side), the fill's first piece tells: one that
    starts a word ("▁") is set apart by a space, another is glued on."""
    spans = iter(gaps)

    def fill(m):
        a, b = next(spans)
        text = tok.decode(ids[a:b])
        glued = m.start() > 0 and not template[m.start() - 1].isspace()
        return " " + text if glued and text and tok.piece(ids[a]).startswith("\u2581") else text
    return " ".join(GAP.sub(fill, template).split())


def draw_lengths(n, hist, gen, min_len=1):
    """n text lengths drawn from the training corpus's length histogram (EOS included)."""
    w = torch.tensor(hist, dtype=torch.float)
    w[:min_len] = 0
    if w.sum() == 0:  # longer than anything in training: the shortest length that fits
        return [min_len] * n
    return torch.multinomial(w, n, replacement=True, generator=gen).tolist()


def generate(diffusion, tok, templates=None, prefix=None, num_samples=1, steps=None, sampler=None, seed=0,
             length=None, lengths_from=None, gap_length=6, batch_size=64, on_step=None, spacing=None,
             guidance=1.0, temperature=None, snap=None, candidates=None, on_texts=None) -> list[str]:
    """Sample texts; the Python face of this script.

    templates: list of template strings -> num_samples fills of each, template after template
    prefix:    a text to continue -> num_samples continuations
    neither:   num_samples unconditional texts
    Lengths (in tokens, EOS included) are `length` if given, else drawn from `lengths_from`, the
    training corpus's length histogram that every checkpoint carries. steps, sampler, spacing,
    guidance, temperature, snap and candidates are those of Diffusion.sample; the default steps,
    spacing, temperature and candidates are the checkpoint's infill_* ones for templates, its
    steps, spacing and temperature and one candidate for a prefix or no context. A gap of open
    length ([gap:..N]) gets the length the model tells (Diffusion.gap_lengths), the same for every
    sample, then is filled. on_texts, if given, is called with each batch's texts as they are done."""
    model = diffusion.model
    max_len = model.cfg.max_len
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    if length is not None and not 1 <= length <= max_len:
        raise UserError(f"--length {length}: must be between 1 and {max_len}, the model's maximum")
    steps, spacing, temperature, candidates = diffusion.cfg.settings(bool(templates), steps, spacing, temperature,
                                                                     candidates)
    if templates:
        templates = [t for t in templates for _ in range(num_samples)]
    else:
        if prefix and MARKER.search(prefix):
            raise UserError("a prefix is plain text to continue; give text with gaps as a template (--template)")
        n_prefix = len(tok.encode(prefix)) if prefix else 0
        if n_prefix + 2 > max_len:
            raise UserError(f"prefix is {n_prefix} tokens; the model takes at most {max_len - 2} before a gap and EOS")
        if length is not None and length < n_prefix + 2:
            raise UserError(f"--length {length} leaves no room after the {n_prefix}-token prefix")
        hist = lengths_from or [0, 0] + [1] * (max_len - 1)
        lengths = [length] * num_samples if length else draw_lengths(num_samples, hist, gen, n_prefix + 2)
        templates = [f"{prefix or ''}[gap:{n - 1 - n_prefix}]" for n in lengths]  # no space: fill_template's call
    unique, lengths = list(dict.fromkeys(templates)), {}
    marked = [parse_template(t, tok, max_len, gap_length) for t in unique]  # a marker for each gap of open length
    for i in range(0, len(unique), batch_size):  # gaps of open length: first how long (once a template)
        if any(any(r[3]) for r in marked[i: i + batch_size]):
            ids, cond, length_mask, up_to = pack(marked[i: i + batch_size], device)
            k = diffusion.gap_lengths(ids, length_mask, cond, up_to, gen=torch.Generator(device=device).manual_seed(seed + i))
            lengths.update({t: n[u > 0].tolist() for t, n, u in zip(unique[i: i + batch_size], k.cpu(), up_to.cpu())})
    rows = [parse_template(t, tok, max_len, gap_length, iter(lengths.get(t, []))) for t in templates]
    texts, step = [], max(1, batch_size // candidates)  # the sampler sees candidates x rows at once
    for i in range(0, len(rows), step):
        chunk = rows[i: i + step]
        ids, cond, length_mask, _ = pack(chunk, device)
        noise_gen = torch.Generator(device=device).manual_seed(seed + i)
        out = diffusion.sample(ids, length_mask, cond, steps=steps, sampler=sampler, gen=noise_gen, on_step=on_step,
                               spacing=spacing, guidance=guidance, temperature=temperature, snap=snap,
                               candidates=candidates)
        texts += [fill_template(t, tok, row, gaps) for t, row, (_, _, gaps, _)
                  in zip(templates[i: i + step], out.tolist(), chunk)]
        if on_texts:
            on_texts(texts[i:])
    return texts


def pack(rows, device):
    """Rows of parse_template -> (ids, cond, length_mask, up_to), (B, L) tensors on `device`, each
    row padded to the longest (PAD, not context, not in the length, 0)."""
    def pad(i, value):
        return pad_sequence([torch.tensor(r[i]) for r in rows], batch_first=True, padding_value=value).to(device)
    length_mask = pad_sequence([torch.ones(len(r[0]), dtype=torch.bool) for r in rows], batch_first=True)
    return pad(0, PAD), pad(1, False), length_mask.to(device), pad(3, 0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: sys.exit(f"error: {message}")  # one line, no usage dump
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py (OUT/ckpt.pt)")
    p.add_argument("--template", action="append", default=[], help="text with [gap] or [gap:N] to fill; may be repeated")
    p.add_argument("--template-file", help="a file of templates, one a line")
    p.add_argument("--prefix", help="text to continue")
    p.add_argument("--num-samples", type=int, default=4, help="texts per template (or in all, without a template)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the checkpoint's, 20 for templates and 100 otherwise in new ones)")
    p.add_argument("--sampler", default="", help=f"update rule, one of {', '.join(SAMPLERS)}; default: the checkpoint's")
    p.add_argument("--spacing", default="", help=f"where the steps fall in t, one of {', '.join(SPACINGS)} "
                   "(default: the checkpoint's, quadratic for templates and restart otherwise in new ones)")
    p.add_argument("--temperature", type=float, help="softmax temperature of the interpolation; below 1 commits sooner "
                   "(default: the checkpoint's, 0.5 for templates and 0.9 otherwise in new ones)")
    p.add_argument("--candidates", type=int, help="texts drawn for each result, of which the one that agrees most "
                   "with the others is kept (default: the checkpoint's, 8 for templates in new ones; 1 otherwise)")
    p.add_argument("--snap", type=float, help="below this t, step with the likeliest token's embedding (default: the checkpoint's)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance weight: 1 plain, 0 ignores the template's words, >1 follows them harder")
    p.add_argument("--seed", type=seed_arg, default=0, help="random seed: the same seed gives the same output")
    p.add_argument("--length", type=int, help="tokens per text, EOS included (default: drawn from the training lengths)")
    p.add_argument("--gap-length", type=int, default=6, help="tokens in a [gap] without a number")
    p.add_argument("--show-steps", action="store_true", help="print the text decoded at intermediate steps (the first candidate of each text)")
    p.add_argument("--no-ema", action="store_true", help="use the trained weights, not their moving average")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--threads", type=threads_arg, default=0, help="torch CPU threads (0: one per core)")
    a = p.parse_args()
    for name in ("num_samples", "steps", "gap_length", "length", "candidates"):
        value = getattr(a, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if a.candidates is not None and a.candidates > 64:
        p.error("--candidates must be at most 64: the draws of one text are sampled in one batch")
    if a.temperature is not None and not 0 < a.temperature < math.inf:
        p.error("--temperature must be positive and finite")
    if not math.isfinite(a.guidance) or a.snap is not None and not math.isfinite(a.snap):
        p.error("--guidance and --snap must be finite")
    if a.length is not None and (a.template or a.template_file):
        p.error("--length is for samples and prefixes; a template's length is its own")
    if a.template and a.prefix or a.template_file and a.prefix:
        p.error("give templates or a prefix, not both")
    set_threads(a.threads)
    try:
        templates = list(a.template)
        if a.template_file:
            from data import read_lines
            templates += read_lines(a.template_file)
        ckpt = checkpoint.load(a.ckpt)
        tok, model, diffusion = checkpoint.build(ckpt, pick_device(a.device), ema=not a.no_ema)
        steps, _, _, candidates = diffusion.cfg.settings(bool(templates), a.steps, candidates=a.candidates)
        if any(re.search(r"\[gap:\s*\.\.", t) for t in templates) and not checkpoint.knows_gap_lengths(ckpt):
            print("note: this checkpoint was trained with --open-rate 0 or before it existed, so it has not learnt "
                  "how long a [gap:..N] should be: the lengths it gives are guesses", file=sys.stderr)
        every = max(1, steps // 10)

        def show_step(i, ids):  # --show-steps
            if (i + 1) % every == 0 or i == 0:
                for row in ids[::candidates].tolist():  # the first candidate of each text
                    print(f"[step {i + 1:>3}/{steps}] {tok.decode(row)}")

        def show(texts):  # each batch as it is done: a long template file shows progress, and Ctrl-C keeps it
            print(*texts, sep="\n", flush=True)

        generate(diffusion, tok, templates=templates, prefix=a.prefix, num_samples=a.num_samples,
                 steps=steps, sampler=a.sampler or None, seed=a.seed, length=a.length,
                 lengths_from=ckpt.get("length_hist"), gap_length=a.gap_length, on_step=show_step if a.show_steps else None,
                 spacing=a.spacing or None, guidance=a.guidance, temperature=a.temperature, snap=a.snap,
                 candidates=candidates, on_texts=show)
    except UserError as e:
        sys.exit(f"error: {e}")
    except ValueError as e:  # an unknown sampler or spacing name
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    run(main)
