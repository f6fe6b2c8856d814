"""The README's "Add your own backbone" example, executed as written: a new backbone defined and
registered, trained a few steps, saved, rebuilt from the checkpoint alone, and sampled."""
import os
import re

import pytest

from conftest import ROOT, SENTENCES
from model import BACKBONES, ModelConfig, build_model, tiny


def readme_example() -> str:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split("### Add your own backbone", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_backbone_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my.txt").write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    scope = {}
    try:
        exec(compile(readme_example(), "README.md", "exec"), scope)
        model, texts = scope["model"], scope["texts"]
        ckpt = scope["checkpoint"].load("runs/plain/ckpt.pt")
        assert ckpt["model_config"]["backbone"] == "plain"
        assert type(model).__name__ == "PlainTransformer" and type(model) is BACKBONES["plain"]
        assert ckpt["step"] == 300
        # the template's words come back as written around each fill
        assert len(texts) == 2 and all(t.startswith("the ") and t.endswith(" dog") for t in texts)
    finally:
        BACKBONES.pop("plain", None)


def test_unknown_backbone_names_the_registered_ones():
    cfg = tiny()
    cfg.backbone = "nonesuch"
    with pytest.raises(ValueError, match="estimator"):
        build_model(cfg)


def test_registering_a_non_denoiser_is_refused():
    from model import register_backbone
    with pytest.raises(TypeError, match="Denoiser"):
        register_backbone("bad")(dict)
    assert "bad" not in BACKBONES and isinstance(build_model(ModelConfig(vocab_size=50, **{
        k: getattr(tiny(), k) for k in ("embed_dim", "width", "depth", "heads", "time_dim")})), BACKBONES["estimator"])
