"""The paper's other scorers, for real: the OCR reward on the engine make test installs (RapidOCR's PP-OCRv4
models from its wheel, no network), the LAION aesthetic predictor's head, any timm ViT as φ (DINOv2,
DINOv3, SigLIP), and a style run with four reference images."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

import configurator
import eval as E
import reward as R
import scorers as S
from inproc import run_main


# ----------------------------------------------------------------------------- OCR

@pytest.mark.parametrize("read, target, score", [
    ("Hello World", "hello world", 1.0),          # spaces and case do not count
    ("xxHELLOworldxx", "Hello World", 1.0),       # the target inside what was read: 1
    ("hellp world", "hello world", 0.9),          # one substitution in 10 letters (spaces removed)
    ("hel", "hello", 0.6),                        # two deletions of 5
    ("completely unrelated text", "abc", 0.0),    # distance capped at the target's length
    ("", "open", 0.0),
    (None, "open", 0.0),                          # the engine failed: the worst score
])
def test_the_published_text_rule(read, target, score):
    assert S.text_score(read, target) == pytest.approx(score)


def test_quoted_text_and_edit_distance():
    assert S.quoted('a neon sign that says "Open Late" at night') == "Open Late"
    assert S.quoted("a cat") is None and S.quoted('a lone " quote') is None and S.quoted('empty ""') is None
    assert [S.levenshtein(a, b) for a, b in (("kitten", "sitting"), ("", "abc"), ("abc", "abc"))] == [3, 3, 0]


def render(text, size=256):
    im = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(im).text((16, size // 2 - 24), text, fill="black", font=ImageFont.load_default(size=40))
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255            # (3, H, W)


@pytest.fixture(scope="module")
def ocr():
    return R.build_reward({"ocr": 1.0})


def test_the_ocr_reward_reads_rendered_words(ocr):
    images = torch.stack([render("HELLO"), render("HELLO"), render("HXLLQ"), torch.ones(3, 256, 256)])
    prompts = ['a sign that reads "HELLO"', 'a poster saying "hello"', 'a sign that reads "HELLO"',
               'a sign that reads "HELLO"']
    r, info = ocr(images, prompts, [{}] * 4)
    assert r[0] >= 0.9 and r[1] >= 0.9                         # a clear word, any case
    assert r[2] == pytest.approx(0.6)                          # two of five letters changed
    assert r[3] == 0.0                                         # a blank image
    assert info["ocr/engine_rapidocr"] == 1.0                  # which engine scored, in the logs


def test_a_prompt_without_quoted_text_scores_zero_said_once(ocr, capsys):
    images = torch.stack([render("CAT")] * 3)
    r, _ = ocr(images, ["a cat"] * 3, [{}] * 3)
    r2, _ = ocr(images, ["a cat"] * 3, [{}] * 3)
    assert r.tolist() == r2.tolist() == [0.0] * 3
    assert capsys.readouterr().out.count("no quoted text in prompt 'a cat'") == 1


def test_ocr_accuracy_is_an_evaluation_metric_when_prompts_quote_text():
    m, _ = E.measure(torch.stack([render("OPEN"), torch.ones(3, 256, 256)]), ['"OPEN"', 'a sign "OPEN"'])
    assert m["ocr"] == pytest.approx(0.5, abs=0.05)
    assert "ocr" not in E.measure(torch.ones(1, 3, 64, 64), ["a cat"])[0]


def test_the_ocr_preset_lists_its_setting():
    p = run_main("train.py", ["config/sd35m_ocr.py", "--help"])
    assert "--reward" in p.stdout
    cfg = configurator.parse_args(["config/sd35m_ocr.py"])
    assert cfg.reward == {"pickscore": 0.5, "ocr": 0.5} and "ocr" in cfg.train_prompts


# ----------------------------------------------------------------------------- aesthetic

def test_aesthetic_head_architecture_normalisation_and_registry():
    head = S.AestheticHead()
    assert [tuple(p.shape) for n, p in head.named_parameters() if n.endswith("weight")] == \
           [(1024, 768), (128, 1024), (64, 128), (16, 64), (1, 16)]
    assert set(head.state_dict()) == {f"layers.{i}.{k}" for i in (0, 2, 4, 6, 7) for k in ("weight", "bias")}
    fn = R.build_reward({"aesthetic": 1.0}, device="cpu", clip_model="random:tiny",
                        aesthetic_weights="random")
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    r, info = fn(images, ["a", "b", "c"], [{}] * 3)
    assert r.shape == (3,) and torch.isfinite(r).all() and "reward/aesthetic" in info
    # the embedding is L2-normalised before the head: the scale of CLIP's output does not matter
    clip = R.CLIPScorer(*R.load_clip("random:tiny", "random:tiny"))
    head = S.load_aesthetic_head("random", clip.model.config.projection_dim)
    assert torch.allclose(r, head(clip.embed_images(images)), atol=1e-6)
    assert torch.allclose(clip.embed_images(images).norm(dim=-1), torch.ones(3), atol=1e-5)


def test_aesthetic_weights_missing_offline_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="could not be loaded.*--aesthetic_weights="):
        S.load_aesthetic_head(str(tmp_path / "nope.pth"))
    saved = tmp_path / "head.pth"
    torch.save(S.load_aesthetic_head("random").state_dict(), saved)  # a local file of the published layout
    assert torch.equal(S.load_aesthetic_head(str(saved)).layers[0].weight,
                       S.load_aesthetic_head("random").layers[0].weight)


# ----------------------------------------------------------------------------- any timm ViT as φ

def vit(name, **kw):
    return R.make_backbone(f"random:{name}", 64, timm_kwargs=dict(depth=2, **kw))


def test_siglip_global_token_is_its_own_attention_pooled_output():
    b = vit("vit_base_patch16_siglip_224", embed_dim=64, num_heads=2)
    phi = R.DinoFeatures(b, 64)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    pooled, patches = phi(x)
    tokens = b.forward_features((x - 0.5) / 0.5)          # SigLIP's own mean / std: 0.5
    assert torch.allclose(pooled, b.forward_head(tokens, pre_logits=True), atol=1e-5)
    assert patches.shape == (2, 16, 64) and torch.allclose(patches, tokens, atol=1e-5)  # every token a patch


def test_dinov3_skips_its_registers_and_dinov2_keeps_its_class_token():
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for name, prefix in (("vit_small_patch16_dinov3", 5), ("vit_small_patch14_dinov2", 1)):
        b = vit(name)
        cls, patches = R.DinoFeatures(b, 64)(x)
        tokens = b.forward_features((x - torch.tensor(R.IMAGENET_MEAN).view(1, 3, 1, 1))
                                    / torch.tensor(R.IMAGENET_STD).view(1, 3, 1, 1))
        assert torch.allclose(cls, tokens[:, 0], atol=1e-5) and patches.shape[1] == tokens.shape[1] - prefix


def test_a_backbone_without_tokens_is_refused_in_one_line():
    import timm
    with pytest.raises(SystemExit, match="not tokens"):
        resnet = timm.create_model("resnet18", pretrained=False, num_classes=0)
        R.DinoFeatures(resnet, 64)(torch.rand(1, 3, 64, 64))


# ----------------------------------------------------------------------------- few references

def test_a_style_run_with_four_reference_images(tmp_path):
    """The paper's style customisation with what a user has: a plain folder of 4 images (fewer than a
    group), drawn with replacement and said in the log."""
    refs = tmp_path / "four"
    refs.mkdir()
    for i in range(4):
        Image.fromarray(np.full((32, 32, 3), 20 + 10 * i, np.uint8)).save(refs / f"{i}.png")
    p = run_main("train.py", ["config/tiny_random_adv.py", f"--references={refs}", "--group_size=8",
                              "--epochs=2", f"--out_dir={tmp_path / 'run'}"])
    assert "as few as 4 for a prompt's 8 generations" in p.stdout and "with replacement" in p.stdout
    assert "epoch    2/2" in p.stdout and "nan" not in p.stdout.split("epoch    2/2")[1].split("\n")[0]


def test_clip_sim_pairs_a_generation_with_its_own_prompts_references():
    class Refs:
        def images_of(self, p):
            return torch.zeros(2, 3, 32, 32) if p == "dark" else torch.ones(2, 3, 32, 32)
    fn = R.build_reward({"clip_sim": 1.0}, device="cpu", references=Refs(), clip_model="random:tiny")
    white = torch.ones(2, 3, 32, 32)
    r, _ = fn(white, ["light", "dark"], [{}] * 2)
    assert r[0] == pytest.approx(1.0, abs=1e-5) and r[1] < 0.999   # its own references, not the others'
    assert R.needs({"clip_sim": 1.0}) == {"references"}
