import os

import pytest
import torch

import checkpoint
from data import UserError
from diffusion import SPACINGS, Diffusion, DiffusionConfig
from model import Estimator, tiny
from timewarp import TimeWarp


def test_save_then_load_gives_identical_outputs(tok, tmp_path):
    cfg = tiny()
    cfg.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    model = Estimator(cfg)
    torch.nn.init.normal_(model.film.weight, std=0.1)
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save(path, model=model.state_dict(), tokenizer=tok.model_bytes, length_hist=[0, 0, 5],
                    **checkpoint.configs(cfg, DiffusionConfig()))
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind
    tok2, model2, diff2 = checkpoint.build(checkpoint.load(path))
    assert tok2.model_bytes == tok.model_bytes
    x = torch.randn(2, 5, cfg.embed_dim)
    mask = torch.ones(2, 5, dtype=torch.bool)
    args = (x, torch.zeros_like(x), torch.zeros_like(x), torch.tensor([0.3, 0.8]), mask)
    assert torch.equal(model(*args)[0], model2(*args)[0])
    ids = torch.randint(4, cfg.vocab_size, (2, 5))
    cond = torch.zeros_like(mask)
    a = Diffusion(model, DiffusionConfig()).sample(ids, mask, cond, steps=3, gen=torch.Generator().manual_seed(0))
    b = diff2.sample(ids, mask, cond, steps=3, gen=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    # no time warp saved (a checkpoint from before every run kept one): warped steps fall back to quadratic
    assert diff2.warp is None and torch.equal(SPACINGS["warped"](5, diff2.warp), SPACINGS["quadratic"](5))


def test_the_time_warp_comes_back_for_the_warped_spacing(tok, tmp_path):
    cfg = tiny()
    cfg.vocab_size = tok.vocab_size
    warp = TimeWarp(floor=0.3)
    warp.update(torch.linspace(0, 1, 20) ** 4, torch.ones(20))  # the loss rises late
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save(path, model=Estimator(cfg).state_dict(), tokenizer=tok.model_bytes, length_hist=[0, 0, 5],
                    time_warp=warp.loss, train_config={"warp_floor": 0.3}, **checkpoint.configs(cfg, DiffusionConfig()))
    _, _, diffusion = checkpoint.build(checkpoint.load(path))
    assert torch.equal(diffusion.warp.loss, warp.loss) and diffusion.warp.floor == 0.3
    ts = SPACINGS["warped"](10, diffusion.warp)
    assert torch.equal(ts, SPACINGS["warped"](10, warp)) and not torch.allclose(ts, SPACINGS["uniform"](10))


def test_mismatched_weights_name_the_keys(tok):
    cfg = tiny()
    cfg.vocab_size = tok.vocab_size
    state = Estimator(cfg).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["out.bias"]
    with pytest.raises(UserError, match=r"missing \['out.bias'\].*unknown \['extra.weight'\]"):
        checkpoint.load_state(Estimator(cfg), state)


def test_unknown_config_key_is_named():
    with pytest.raises(UserError, match="colour"):
        checkpoint.config_from(DiffusionConfig, {**DiffusionConfig().__dict__, "colour": "red"}, "diffusion")


def test_every_differing_key_and_shape_is_named(tok):
    cfg = tiny()
    cfg.vocab_size = tok.vocab_size
    state = Estimator(cfg).state_dict()
    gone = [k for k in state if k.startswith("blocks.1.")]  # more than a handful
    for k in gone:
        del state[k]
    state["out.weight"] = torch.zeros(3, 3)
    with pytest.raises(UserError) as e:
        checkpoint.load_state(Estimator(cfg), state)
    assert len(gone) > 5 and all(k in str(e.value) for k in gone)
    assert "out.weight (3, 3) vs" in str(e.value)


def test_a_checkpoint_of_an_unregistered_backbone_is_a_clear_error(tok):
    cfg = tiny()
    cfg.vocab_size = tok.vocab_size
    ckpt = {"version": checkpoint.VERSION, "tokenizer": tok.model_bytes, "model": Estimator(cfg).state_dict(),
            **checkpoint.configs(cfg, DiffusionConfig())}
    ckpt["model_config"]["backbone"] = "from-a-module-not-imported"
    with pytest.raises(UserError, match="from-a-module-not-imported.*import its module"):
        checkpoint.build(ckpt)


def test_a_setting_added_later_reproduces_old_checkpoints():
    """A checkpoint written before a setting existed loads with the value it was made with; any
    other missing key is still an error."""
    later = ("temperature", "spacing", "skip", "infill_steps", "infill_temperature", "infill_spacing", "infill_candidates",
             "expected")
    old = {k: v for k, v in DiffusionConfig().__dict__.items() if k not in later}
    cfg = checkpoint.config_from(DiffusionConfig, old, "diffusion")
    assert cfg.temperature == cfg.infill_temperature == 1.0 and cfg.spacing == cfg.infill_spacing == "uniform"
    assert cfg.skip is False and cfg.infill_candidates == 1 < DiffusionConfig.infill_candidates  # one fill, as before
    assert cfg.expected is False  # x̂0 the network's output, as before
    # the infill settings came later still: a checkpoint without them fills templates as it samples
    cfg = checkpoint.config_from(DiffusionConfig, {**old, "temperature": 0.9, "spacing": "quadratic", "steps": 20},
                                 "diffusion")
    assert cfg.infill_temperature == cfg.temperature == 0.9 and cfg.infill_spacing == cfg.spacing == "quadratic"
    assert cfg.infill_steps == cfg.steps == 20
    no_schedule = {k: v for k, v in DiffusionConfig().__dict__.items() if k != "schedule"}
    with pytest.raises(UserError, match="missing keys \\['schedule'\\]"):
        checkpoint.config_from(DiffusionConfig, no_schedule, "diffusion")


def test_weights_added_later_come_as_zeros():
    """A checkpoint from before the gap-length head loads, its head zero (every length alike); any
    other missing weight is still an error."""
    cfg = tiny()
    model = Estimator(cfg)
    old = {k: v for k, v in model.state_dict().items() if not k.startswith("gap_head.")}
    fresh = Estimator(cfg)
    checkpoint.load_state(fresh, old)
    assert not fresh.gap_head.weight.any() and not fresh.gap_head.bias.any()
    assert torch.equal(fresh.film.weight, model.film.weight)
    with pytest.raises(UserError, match="missing \\['film.bias'\\]"):
        checkpoint.load_state(fresh, {k: v for k, v in old.items() if k != "film.bias"})
