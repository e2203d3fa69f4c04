"""Tests for data.py (prompt files, epoch prompt choice, per-rank assignment, reference images) and
prepare.py (making references). All inputs are tiny files written to tmp_path; CPU only."""

import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import prepare  # noqa: E402
from data import ReferenceSet, assign_samples, epoch_prompt_indices, load_prompts  # noqa: E402

# -----------------------------------------------------------------------------------------------
# load_prompts


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_txt_prompts(tmp_path):
    p = write(tmp_path / "p.txt", "a red circle\n  a blue square \n")
    assert load_prompts(p) == [{"prompt": "a red circle"}, {"prompt": "a blue square"}]


def test_jsonl_keeps_metadata(tmp_path):
    p = write(tmp_path / "p.jsonl", '{"prompt": "a cat", "tag": "animal", "n": 1}\n{"prompt": "a dog"}\n')
    assert load_prompts(p) == [{"prompt": "a cat", "tag": "animal", "n": 1}, {"prompt": "a dog"}]


def test_blank_interior_line_names_line(tmp_path):
    p = write(tmp_path / "p.txt", "one\ntwo\n   \nfour\n")
    with pytest.raises(ValueError, match=r"p\.txt:3: blank line.*empty prompt"):
        load_prompts(p)


def test_bad_json_names_line(tmp_path):
    p = write(tmp_path / "p.jsonl", '{"prompt": "ok"}\n{"prompt": "oops"\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:2: bad JSON"):
        load_prompts(p)


@pytest.mark.parametrize("line", ['{"text": "no prompt key"}', '{"prompt": 3}', '["prompt"]'])
def test_jsonl_without_string_prompt(tmp_path, line):
    p = write(tmp_path / "p.jsonl", '{"prompt": "ok"}\n' + line + "\n")
    with pytest.raises(ValueError, match=r"p\.jsonl:2:.*\"prompt\""):
        load_prompts(p)


def test_empty_missing_and_unknown_files(tmp_path):
    with pytest.raises(ValueError, match=r"empty\.txt is empty"):
        load_prompts(write(tmp_path / "empty.txt", ""))
    with pytest.raises(ValueError, match=r"nope\.txt does not exist"):
        load_prompts(str(tmp_path / "nope.txt"))
    with pytest.raises(ValueError, match=r"p\.csv: unknown extension"):
        load_prompts(write(tmp_path / "p.csv", "a\n"))

# -----------------------------------------------------------------------------------------------
# epoch_prompt_indices / assign_samples


def test_epoch_indices_deterministic_and_epoch_dependent():
    a = epoch_prompt_indices(100, 10, epoch=3, seed=7)
    assert a == epoch_prompt_indices(100, 10, epoch=3, seed=7)
    assert a != epoch_prompt_indices(100, 10, epoch=4, seed=7)
    # seed + epoch must not collide (the published sampler's seed + epoch does)
    assert epoch_prompt_indices(100, 10, epoch=1, seed=0) != epoch_prompt_indices(100, 10, epoch=0, seed=1)
    assert all(type(i) is int and 0 <= i < 100 for i in a)


def test_epoch_indices_ignore_global_rng():
    torch.manual_seed(0); np.random.seed(0)
    a = epoch_prompt_indices(50, 8, epoch=0, seed=1)
    torch.manual_seed(123); np.random.seed(123)
    assert a == epoch_prompt_indices(50, 8, epoch=0, seed=1)


def test_epoch_indices_without_replacement():
    idx = epoch_prompt_indices(20, 20, epoch=0, seed=0)
    assert sorted(idx) == list(range(20))
    assert len(set(epoch_prompt_indices(20, 15, epoch=5, seed=0))) == 15


def test_epoch_indices_more_than_available():
    idx = epoch_prompt_indices(3, 8, epoch=2, seed=0)
    assert len(idx) == 8 and set(idx) == {0, 1, 2}
    assert sorted(idx[:3]) == sorted(idx[3:6]) == [0, 1, 2]  # each prompt once before any twice


def test_assign_samples_partition_and_groups():
    prompts = [5, 2, 9]
    slices = [assign_samples(prompts, group_size=4, world_size=4, rank=r) for r in range(4)]
    full = slices[0][0]
    assert full == [5] * 4 + [2] * 4 + [9] * 4  # groups contiguous, in prompt order
    assert all(s[0] == full for s in slices)     # every rank sees the same global list
    assert sum((full[s] for _, s in slices), []) == full  # rank slices tile the list in order
    assert [s.stop - s.start for _, s in slices] == [3, 3, 3, 3]


def test_assign_samples_not_divisible():
    with pytest.raises(ValueError,
                       match=r"prompts_per_epoch \(3\).*group_size \(3\).*world size 4.*multiple of 4"):
        assign_samples([0, 1, 2], group_size=3, world_size=4, rank=0)

# -----------------------------------------------------------------------------------------------
# ReferenceSet

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def solid(path, rgb, size=(8, 8), mode="RGB"):
    Image.new(mode, size, rgb).save(path)
    return path.name


@pytest.fixture
def colour_index(tmp_path):
    """Three prompts, each with references of one solid colour (3, 2 and 1 images)."""
    index = {}
    for k, (name, rgb) in enumerate(COLOURS.items()):
        index[f"a {name} thing"] = [solid(tmp_path / f"{name}{i}.png", rgb) for i in range(3 - k)]
    write(tmp_path / "refs.json", json.dumps(index))
    return str(tmp_path / "refs.json")


def test_from_index_loads_and_missing(colour_index):
    refs = ReferenceSet.from_index(colour_index)
    assert refs.prompts == ["a red thing", "a green thing", "a blue thing"]
    assert len(refs) == 6 and refs.images.dtype == torch.uint8 and refs.images.shape == (6, 3, 8, 8)
    assert refs.missing(["a red thing", "a pink thing", "a blue thing", "a pink thing"]) == ["a pink thing"]
    assert refs.images_of("a green thing").shape == (2, 3, 8, 8)


def test_sample_draws_own_references_deterministically(colour_index):
    refs = ReferenceSet.from_index(colour_index)
    prompts = ["a blue thing", "a red thing", "a green thing"]
    x = refs.sample(prompts, 4, torch.Generator().manual_seed(0))
    assert x.shape == (12, 3, 8, 8) and x.dtype == torch.float32
    for k, name in enumerate(["blue", "red", "green"]):  # prompt order kept, each from its own colour
        expected = torch.tensor(COLOURS[name], dtype=torch.float32).view(1, 3, 1, 1) / 255
        assert torch.equal(x[4 * k:4 * (k + 1)], expected.expand(4, 3, 8, 8))
    assert torch.equal(x, refs.sample(prompts, 4, torch.Generator().manual_seed(0)))
    with pytest.raises(KeyError, match="a pink thing"):
        refs.sample(["a pink thing"], 1, torch.Generator())


def test_sample_without_replacement_when_enough(tmp_path):
    # 4 references of one prompt with distinct grey levels: drawing 4 must use each exactly once.
    names = [solid(tmp_path / f"g{v}.png", (v, v, v)) for v in (10, 20, 30, 40)]
    write(tmp_path / "refs.json", json.dumps({"p": names}))
    refs = ReferenceSet.from_index(str(tmp_path / "refs.json"))
    for seed in range(5):
        x = refs.sample(["p"], 4, torch.Generator().manual_seed(seed))
        assert sorted(round(v * 255) for v in x[:, 0, 0, 0].tolist()) == [10, 20, 30, 40]


def test_conversion_and_resize(tmp_path):
    Image.new("L", (10, 6), 128).save(tmp_path / "gray.png")
    rgba = Image.new("RGBA", (7, 13), (0, 0, 0, 0))          # fully transparent black ...
    rgba.putpixel((3, 6), (255, 0, 0, 255))                  # ... with one opaque red pixel
    rgba.save(tmp_path / "rgba.png")
    Image.new("P", (5, 5), 0).save(tmp_path / "pal.png")
    Image.new("RGB", (31, 17), (0, 0, 200)).save(tmp_path / "odd.jpg", quality=95)
    names = ["gray.png", "rgba.png", "pal.png", "odd.jpg"]
    write(tmp_path / "refs.json", json.dumps({"p": names}))
    refs = ReferenceSet.from_index(str(tmp_path / "refs.json"), size=4)
    x = refs.images_of("p")
    assert x.shape == (4, 3, 4, 4) and x.min() >= 0 and x.max() <= 1
    assert torch.allclose(x[0], torch.full((3, 4, 4), 128 / 255))  # grayscale -> 3 equal channels
    assert torch.equal(x[1][:, 0, 0], torch.ones(3))              # transparent corner -> white, not black
    assert (x[3][2] > 0.7).all() and (x[3][:2] < 0.1).all()       # blue jpg stays blue after resize


def test_center_crop_keeps_middle(tmp_path):
    # A 12x4 image: black left third, white middle third, black right third -> square crop is all white.
    im = Image.new("RGB", (12, 4), (0, 0, 0))
    im.paste((255, 255, 255), (4, 0, 8, 4))
    im.save(tmp_path / "wide.png")
    write(tmp_path / "refs.json", json.dumps({"p": ["wide.png"]}))
    x = ReferenceSet.from_index(str(tmp_path / "refs.json"), size=4).images_of("p")
    assert torch.equal(x, torch.ones(1, 3, 4, 4))


def test_sizes_differ_without_size(tmp_path):
    names = [solid(tmp_path / "a.png", (1, 2, 3), (8, 8)), solid(tmp_path / "b.png", (1, 2, 3), (9, 8))]
    write(tmp_path / "refs.json", json.dumps({"p": names}))
    with pytest.raises(ValueError, match=r"a\.png.*b\.png.*size="):
        ReferenceSet.from_index(str(tmp_path / "refs.json"))


@pytest.fixture
def bad_index(tmp_path):
    """Prompt "good" has one fine image; "mixed" has a fine, a missing and a corrupt one;
    "dead" only corrupt."""
    solid(tmp_path / "ok.png", (9, 9, 9))
    (tmp_path / "corrupt.png").write_bytes(np.random.default_rng(0).bytes(200))
    (tmp_path / "zero.png").write_bytes(b"")
    write(tmp_path / "refs.json", json.dumps({
        "good": ["ok.png"], "mixed": ["ok.png", "gone.png", "corrupt.png"], "dead": ["zero.png"]}))
    return str(tmp_path / "refs.json")


@pytest.mark.parametrize("listed, pattern", [
    (["ok.png", "gone.png"], r"gone\.png does not exist \(listed for prompt 'p' in .*refs\.json\)"),
    (["ok.png", "corrupt.png"], r"corrupt\.png cannot be read.*prompt 'p'"),
    (["zero.png"], r"zero\.png is empty.*prompt 'p'"),
])
def test_bad_file_named_with_its_prompt(tmp_path, bad_index, listed, pattern):
    write(tmp_path / "refs.json", json.dumps({"p": listed}))  # reuse bad_index's image files
    with pytest.raises(ValueError, match=pattern):
        ReferenceSet.from_index(bad_index)


def test_truncated_file_named(tmp_path):
    solid(tmp_path / "full.png", (9, 9, 9), (64, 64))
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])  # valid header, missing pixel data
    write(tmp_path / "refs.json", json.dumps({"p": ["cut.png"]}))
    with pytest.raises(ValueError, match=r"cut\.png cannot be read"):
        ReferenceSet.from_index(str(tmp_path / "refs.json"))


def test_skip_bad_drops_and_warns(bad_index):
    with pytest.warns(UserWarning, match=r"refs\.json: skipped 3 unreadable.*1 prompt\(s\) lost"):
        refs = ReferenceSet.from_index(bad_index, skip_bad=True)
    assert sorted(os.path.basename(p) for p in refs.skipped) == ["corrupt.png", "gone.png", "zero.png"]
    assert refs.prompts == ["good", "mixed"]  # "dead" lost every image
    assert refs.missing(["good", "mixed", "dead"]) == ["dead"]
    assert len(refs) == 1                     # ok.png loaded once though listed twice


def test_everything_bad_is_an_error(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    write(tmp_path / "refs.json", json.dumps({"p": ["zero.png"]}))
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"refs\.json: no reference images left"):
        ReferenceSet.from_index(str(tmp_path / "refs.json"), skip_bad=True)


@pytest.mark.parametrize("text, pattern", [
    ('{"p": ["a.png"],\n "q": [}', r"refs\.json: bad JSON at line 2"),
    ('["a.png"]', r"refs\.json: expected a JSON object"),
    ('{"p": "a.png"}', r"refs\.json: key 'p' must map to a list"),
    ('{"p": ["a.png", 3]}', r"refs\.json: key 'p' must map to a list"),
])
def test_bad_index_json(tmp_path, text, pattern):
    with pytest.raises(ValueError, match=pattern):
        ReferenceSet.from_index(write(tmp_path / "refs.json", text))
    with pytest.raises(ValueError, match=r"nothere\.json does not exist"):
        ReferenceSet.from_index(str(tmp_path / "nothere.json"))


def test_index_root_override(tmp_path):
    (tmp_path / "imgs").mkdir()
    solid(tmp_path / "imgs" / "r.png", (255, 0, 0))
    write(tmp_path / "refs.json", json.dumps({"p": ["r.png"]}))
    refs = ReferenceSet.from_index(str(tmp_path / "refs.json"), root=str(tmp_path / "imgs"))
    assert refs.images[0, :, 0, 0].tolist() == [255, 0, 0]


def test_from_folder_serves_every_prompt(tmp_path):
    for name in ("b.png", "a.jpg"):
        solid(tmp_path / name, (0, 255, 0))
    solid(tmp_path / "c.png", (0, 0, 255))
    write(tmp_path / "notes.txt", "not an image")
    refs = ReferenceSet.from_folder(str(tmp_path), size=8)
    assert [os.path.basename(f) for f in refs.files] == ["a.jpg", "b.png", "c.png"]  # sorted, .txt ignored
    assert refs.prompts is None and refs.missing(["anything", "at all"]) == [] and len(refs) == 3
    x = refs.sample(["any prompt", "another"], 3, torch.Generator().manual_seed(1))
    assert x.shape == (6, 3, 8, 8)
    # 3 of 3 without replacement: each prompt's draw is the whole folder in some order
    for k in range(2):
        blues = (x[3 * k:3 * (k + 1), 2, 0, 0] > 0.9).sum().item()
        assert blues == 1
    assert torch.equal(refs.images_of("whatever"), refs.images.float() / 255)


def test_make_references_writes_the_published_index_format(tmp_path):
    """Any diffusers pipeline → PNGs + {prompt: [relative paths]} that ReferenceSet reads back."""
    import model as M
    M.random_pipeline("tiny").save_pretrained(tmp_path / "pipe")
    (tmp_path / "p.txt").write_text("a red circle\na blue square\n")
    index = prepare.make_references(str(tmp_path / "pipe"), str(tmp_path / "p.txt"), str(tmp_path / "refs"),
                                    n=3, steps=2, size=32, batch_size=2, device="cpu")
    refs = data.ReferenceSet.from_index(index)
    assert refs.prompts == ["a red circle", "a blue square"] and len(refs) == 6
    assert refs.images_of("a blue square").shape == (3, 3, 32, 32)


def test_reference_guidance_follows_the_pipeline():
    """make_references asks each pipeline for CFG its own way. Qwen-Image (the paper's reference model) only
    runs CFG given true_cfg_scale and a negative prompt; its guidance_scale would be ignored (no CFG)."""
    from types import SimpleNamespace as NS

    from diffusers import FluxPipeline, QwenImagePipeline, StableDiffusion3Pipeline
    qwen = NS(__call__=QwenImagePipeline.__call__, transformer=NS(config={"guidance_embeds": False}))
    assert prepare.guidance_kwargs(qwen, 4.0, 2) == dict(true_cfg_scale=4.0, negative_prompt=[" ", " "])
    flux_dev = NS(__call__=FluxPipeline.__call__, transformer=NS(config={"guidance_embeds": True}))
    # distilled: guidance is an input
    assert prepare.guidance_kwargs(flux_dev, 3.5, 1) == dict(guidance_scale=3.5)
    sd3 = NS(__call__=StableDiffusion3Pipeline.__call__, transformer=NS(config={}))
    assert prepare.guidance_kwargs(sd3, 4.5, 3) == dict(guidance_scale=4.5)


# --- files as people save them --------------------------------------------------------------------

@pytest.mark.parametrize("encoding", ["utf-16", "latin-1"])
def test_prompt_and_index_files_not_in_utf8_are_named_in_one_line(tmp_path, encoding):
    (tmp_path / "p.txt").write_bytes("a red café\nune forêt\n".encode(encoding))
    bad = rf"^prompt file {tmp_path / 'p.txt'} is not UTF-8 text \(byte \d+: "
    with pytest.raises(ValueError, match=bad):
        load_prompts(str(tmp_path / "p.txt"))
    (tmp_path / "i.json").write_bytes('{"une forêt": ["a.png"]}'.encode(encoding))
    with pytest.raises(ValueError, match=rf"^reference index {tmp_path / 'i.json'} is not UTF-8 text"):
        ReferenceSet.from_index(str(tmp_path / "i.json"))


def test_every_newline_convention_splits_prompts_and_a_nul_byte_is_refused(tmp_path):
    for name, text in (("mac.txt", "a red circle\ra blue square\r"),
                       ("dos.txt", "a red circle\r\na blue square"),
                       ("mix.jsonl", '{"prompt": "a red circle"}\r{"prompt": "a blue square"}\n')):
        write(tmp_path / name, text)
        assert [p["prompt"] for p in load_prompts(str(tmp_path / name))] == ["a red circle", "a blue square"]
    (tmp_path / "nul.txt").write_bytes(b"a red circle\na blue\x00square\n")
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'nul.txt'}:2: a NUL byte"):
        load_prompts(str(tmp_path / "nul.txt"))


def test_a_float_tiff_in_0_to_1_reads_as_its_values(tmp_path):
    a = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    Image.fromarray(a, mode="F").save(tmp_path / "f.tif")
    im = data._load_image(str(tmp_path / "f.tif"), None)
    assert im.shape == (3, 64, 64) and abs(im.float().mean().item() - 127.5) < 1 and im.max() == 255
    Image.fromarray(a * 255, mode="F").save(tmp_path / "big.tif")   # floats beyond 1: pixel values
    assert abs(data._load_image(str(tmp_path / "big.tif"), None).float().mean().item() - 127.5) < 1
