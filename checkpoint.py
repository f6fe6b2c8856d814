"""Checkpoints: everything needed to sample or to resume, in one file, written atomically; and the
Ctrl-C (or closed terminal) handler that lets a training run save before it stops.

A checkpoint holds the model and optimizer states, the step, the RNG states, every config as a plain
dict and the tokenizer model's bytes: `sample.py` needs nothing else. Files are loaded with
`weights_only=True`, so a checkpoint from a stranger cannot run code.
"""
import contextlib
import os
import pickle
import re
import shutil
import signal
import tempfile
from dataclasses import asdict, fields

import torch

from data import UserError, die_of, quiet_terminal
from diffusion import Diffusion, DiffusionConfig
from timewarp import TimeWarp
from model import ModelConfig, build_model
from tokenizer import Tokenizer

VERSION = 1


class Stopped(Exception):
    """Training saved and stopped because of signal `signum` (Ctrl-C, a closed terminal, a kill)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopFlag:
    """First SIGINT/SIGTERM/SIGHUP (a closed terminal): finish the step, save, exit. A second SIGINT
    or SIGTERM: exit at once. `release()` gives the signals back to the handlers from before, once
    training is over; `signum` is the first signal, or 0."""

    def __init__(self):
        self.stop, self.signum = False, 0
        signals = [signal.SIGINT, signal.SIGTERM]
        if hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # nohup: ignored
            signals.append(signal.SIGHUP)
        self.before = {s: signal.signal(s, self.handle) for s in signals}

    def handle(self, signum, frame):
        hangup = signum == getattr(signal, "SIGHUP", None)
        if self.stop and not hangup:  # a closed terminal may send two: the shell's and the kernel's
            die_of(signum)
        if hangup:
            quiet_terminal()
        self.stop, self.signum = True, self.signum or signum
        # os.write, not print: the signal may come in the middle of a print, and a buffered stream
        # refuses a second write inside one (RuntimeError: reentrant call)
        with contextlib.suppress(OSError):  # stderr closed
            os.write(2, b"\nstopping: saving where it is (Ctrl-C again to quit at once)\n")

    def release(self):
        for s, handler in self.before.items():
            signal.signal(s, handler)


def save(path: str, keep: int | None = None, **state):
    """Write to a temporary file in the same folder, flush it to disk, then rename over `path`:
    a crash at any instant leaves either the old checkpoint or the new one, never half of one.
    With `keep` (training runs), the newest `keep` checkpoints stay as ckpt-STEP.pt beside it."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".ckpt-", suffix=".tmp")
    try:
        try:  # as open() would make it, not mkstemp's owner-only 0600; best effort (Windows, vfat)
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)
        except (AttributeError, OSError):
            pass
        with os.fdopen(fd, "wb") as f:
            torch.save({"version": VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        if keep and keep > 1:
            kept = os.path.join(folder, f"ckpt-{state.get('step', 0):08d}.pt")
            if os.path.exists(kept):
                os.remove(kept)
            os.link(tmp, kept)  # a second name for the same finished file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if keep is None or keep < 2:  # a run without --keep leaves the files of an earlier --keep run alone
        return
    history = sorted(f for f in os.listdir(folder) if re.fullmatch(r"ckpt-\d{8}\.pt", f))
    for old in history[: max(0, len(history) - keep)]:
        os.remove(os.path.join(folder, old))


def check_writable(out: str, need_bytes: int, flag: str = "--out"):
    """Fail before training, not after an hour of it, if checkpoints cannot be written to folder `out`."""
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, ".write-test")
        with open(probe, "wb") as f:
            f.write(b"0")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{flag} {out}: cannot write there ({e.strerror})") from None
    free = shutil.disk_usage(out).free
    if free < 2 * need_bytes:
        raise UserError(f"--out {out}: {free / 2**20:.0f} MiB free, a checkpoint needs about {need_bytes / 2**20:.0f} MiB (twice that while writing)")


def check_resume(ckpt: dict, path: str, run: dict):
    """Refuse to resume `ckpt` (at `path`) with the settings `run` (train.py's, as a dict) where they
    would make it another run: the model's shape, the noise, the data order, the batch."""
    if ckpt.get("kind") == "judge" or "model_config" not in ckpt:
        raise UserError(f"{path} is not a checkpoint written by train.py (a judge?); use another --out")
    before, shape = ckpt.get("train_config", {}), ckpt["model_config"]
    for key in ("preset", "max_len", "embed_dim", "backbone", "schedule", "noise_scale", "uncond_rate", "sampler",
                "self_cond_rate", "skip", "expected", "open_rate", "batch_size", "seed"):
        was, now = before.get(key), run[key]
        if key == "expected":  # the loss the checkpoint was trained with: its diffusion config says
            was = ckpt.get("diffusion_config", {}).get(key, ADDED_LATER[key])
        if key in ("max_len", "embed_dim"):  # 0: the model's own; a number: compare with the model's
            if not now:
                continue
            was = shape[key]
        if was is not None and was != now:
            hint = " (--grad-accum takes less memory a step for the same batch)" if key == "batch_size" else ""
            raise UserError(f"{path} was trained with --{key.replace('_', '-')} {was}; resuming with {now} would "
                            f"not continue that run: use the same value or another --out{hint}")
    if not all(k in ckpt["model"] for k in WEIGHTS_ADDED_LATER):
        raise UserError(f"{path} was written by an older version, without the gap-length head; "
                        f"it samples as it did, but a run cannot resume from it: use another --out")


def check_output(flag: str, path: str, inputs) -> None:
    """Fail before the work, not after it, if writing `path` would fail on a folder or destroy one
    of the run's input files (a run's folder as an input stands for its ckpt.pt)."""
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder; give a file name")
    if not os.path.isfile(path):  # a new file destroys nothing
        return
    for other in map(resolve, filter(None, inputs)):
        if os.path.isfile(other) and os.path.samefile(path, other):
            raise UserError(f"{flag} {path} is also an input of this run ({other}); writing it would destroy that")


def resolve(path: str) -> str:
    """--ckpt may name a run's folder: its ckpt.pt."""
    inside = os.path.join(path, "ckpt.pt")
    return inside if os.path.isdir(path) and os.path.isfile(inside) else path


def load(path: str, map_location="cpu") -> dict:
    """Load and check a checkpoint (a run's folder means its ckpt.pt); any problem is a UserError with
    one clear line."""
    path = resolve(path)
    if os.path.isdir(path):
        raise UserError(f"{path}: a folder without ckpt.pt; give a checkpoint written by train.py")
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such checkpoint")
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # torch.save writes a zip archive
            raise UserError(f"{path}: not a checkpoint (not a file written by torch.save)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported" in str(e):
            raise UserError(f"{path}: refused: the file holds Python objects that could run code "
                            f"(only tensors and plain values are loaded)") from None
        raise UserError(f"{path}: not a checkpoint (cannot be read: {str(e).splitlines()[0]})") from None
    except Exception as e:  # zip errors, truncated files, text files...
        raise UserError(f"{path}: not a checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "version" not in ckpt:
        raise UserError(f"{path}: not a checkpoint of this project")
    if ckpt["version"] != VERSION:
        raise UserError(f"{path}: checkpoint version {ckpt['version']}, this code reads version {VERSION}")
    return ckpt


# Settings added to the configs after checkpoints of this version were first written, with the value
# that reproduces what those checkpoints did (infill_steps, infill_temperature and infill_spacing:
# their steps, temperature and spacing, which they used for templates too). Any other missing key is
# an error.
ADDED_LATER = {"backbone": "estimator", "spacing": "uniform", "temperature": 1.0, "snap": 0.0, "skip": False,
               "infill_candidates": 1, "expected": False}


def config_from(cls, d: dict, what: str):
    """Rebuild a config dataclass, naming any key that this code does not know or lacks."""
    names = {f.name for f in fields(cls)}
    d = {**{k: v for k, v in ADDED_LATER.items() if k in names}, **d}
    for fill, sample in (("infill_steps", "steps"), ("infill_temperature", "temperature"),
                         ("infill_spacing", "spacing")):
        if fill in names:
            d.setdefault(fill, d[sample])
    unknown, missing = sorted(set(d) - names), sorted(names - set(d))
    if unknown or missing:
        raise UserError(f"{what} config does not match this code: unknown keys {unknown}, missing keys {missing}")
    return cls(**d)


def build(ckpt: dict, device="cpu", ema=True):
    """Tokenizer, model (weights loaded, strict) and Diffusion from a checkpoint alone. The weights
    are the moving average, where training kept one and `ema` is True, else the trained ones."""
    missing = [k for k in ("tokenizer", "model_config", "diffusion_config", "model") if k not in ckpt]
    if ckpt.get("kind", "diffusion") != "diffusion" or missing:
        raise UserError(f"not a checkpoint written by train.py ({ckpt.get('kind') or 'missing ' + ', '.join(missing)})")
    try:
        tok = Tokenizer(ckpt["tokenizer"])
    except ValueError as e:
        raise UserError(f"checkpoint's tokenizer: {e}") from None
    mcfg = config_from(ModelConfig, ckpt["model_config"], "model")
    dcfg = config_from(DiffusionConfig, ckpt["diffusion_config"], "diffusion")
    if mcfg.vocab_size != tok.vocab_size:
        raise UserError(f"checkpoint's model has {mcfg.vocab_size} tokens but its tokenizer {tok.vocab_size}")
    try:
        model = build_model(mcfg)
    except ValueError as e:
        raise UserError(f"checkpoint's model config: {e}") from None
    load_state(model, ckpt["ema"] if ema and "ema" in ckpt else ckpt["model"])
    model.to(device).eval()
    warp = None  # the loss curve training fitted, for the warped and restart spacings; older checkpoints lack it
    if "time_warp" in ckpt:
        warp = TimeWarp(bins=len(ckpt["time_warp"]), floor=ckpt.get("train_config", {}).get("warp_floor", 0.2))
        warp.loss = ckpt["time_warp"].float().cpu()
    try:
        return tok, model, Diffusion(model, dcfg, warp)
    except ValueError as e:  # a schedule or sampler name this code does not know
        raise UserError(f"checkpoint's diffusion config: {e}") from None


# Weights added after checkpoints of this version were first written: those checkpoints get them as
# zeros (gap_head: every length of a [gap:..N] alike, so its median, about N/2).
WEIGHTS_ADDED_LATER = ("gap_head.weight", "gap_head.bias")


def knows_gap_lengths(ckpt: dict) -> bool:
    """Whether training taught the checkpoint's gap-length head: a [gap:..N] gets a length it learnt."""
    return bool(ckpt.get("train_config", {}).get("open_rate")) and all(k in ckpt["model"] for k in WEIGHTS_ADDED_LATER)


def load_state(model, state: dict):
    """Strict load that names the keys and shapes that differ."""
    own = model.state_dict()
    state = {**{k: torch.zeros_like(own[k]) for k in WEIGHTS_ADDED_LATER if k in own}, **state}
    missing, unknown = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unknown or shapes:
        raise UserError(f"checkpoint weights do not fit the model: missing {missing}, "
                        f"unknown {unknown}, shapes differ {shapes}")
    model.load_state_dict(state)


def configs(model_cfg: ModelConfig, diff_cfg: DiffusionConfig) -> dict:
    return {"model_config": asdict(model_cfg), "diffusion_config": asdict(diff_cfg)}
