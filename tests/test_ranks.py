"""Results do not depend on the number of ranks: every random draw of an epoch is made per image (seeded by
the image's global index) or globally, and each rank takes its share of every optimizer step."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import data
import nft
import reward as R
import train as T
from configurator import split_error, step_chunks, timesteps_per_image
from test_train import ADV_PRESET, tiny_cfg

# 8 images an epoch, 2 optimizer steps, D and G every epoch, 4 of the 16 patch tokens drawn per image
RUN = dict(epochs=3, schedule="shared", d_patches=4)


def _state(gen, adversary):
    """The LoRA weights and every tensor of the discriminator's state (head and Adam moments)."""
    out = {f"G.{k}": v.detach().clone() for k, v in gen.params.items()}
    head = adversary.head_state()
    out.update({f"D.{k}": v.detach().clone() for k, v in head["head"].items()})
    for i, s in head["opt"]["state"].items():
        out.update({f"D.adam.{i}.{k}": v.clone() for k, v in s.items() if torch.is_tensor(v)})
    return out


def _worker(rank, world, port, out_dir, kw):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    gen, adversary, _ = T.train(tiny_cfg(ADV_PRESET, out_dir=out_dir, **kw))
    torch.save(_state(gen, adversary), os.path.join(out_dir, f"rank{rank}.pt"))


def _two_ranks(tmp_path, **kw):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path / "two"), kw), nprocs=2, join=True)
    return torch.load(tmp_path / "two" / "rank0.pt")


def _steps(cfg, world):
    """Epoch 0's optimizer steps under `world` ranks: per step, the set of (global image, trained step)."""
    n = cfg.prompts_per_epoch * cfg.group_size // world
    steps = [set() for _ in range(cfg.updates_per_epoch)]
    for rank in range(world):
        passes = T.training_passes(cfg, 0, rank, n, torch.device("cpu"))
        accum = len(passes) // cfg.updates_per_epoch
        for k, (mb, j) in enumerate(passes):
            assert len(mb) == cfg.train_batch_size
            steps[k // accum] |= {(rank * n + int(i), j) for i in mb}
    return steps


@pytest.mark.parametrize("kw", [dict(), dict(updates_per_epoch=4), dict(updates_per_epoch=1),
                                dict(prompts_per_epoch=3, train_batch_size=1, sample_batch_size=1,
                                     window_size=3, updates_per_epoch=3), dict(objective="nft")])
def test_every_world_size_takes_the_same_optimizer_steps(kw):
    """Each rank takes its share of every step: the union over ranks is the one-process step, for every
    world size the config allows; every image's every trained step is in exactly one step."""
    cfg = tiny_cfg(ADV_PRESET, **kw)
    n_global = cfg.prompts_per_epoch * cfg.group_size
    worlds = [w for w in range(1, n_global + 1) if split_error(cfg, w) is None]
    assert len(worlds) >= 2
    one, K = _steps(cfg, 1), timesteps_per_image(cfg) if cfg.objective == "nft" else cfg.window_size
    assert sorted(p for s in one for p in s) == sorted((i, j) for i in range(n_global) for j in range(K))
    assert all(_steps(cfg, w) == one for w in worlds[1:])


def test_the_paper_defaults_split_the_images_not_the_window():
    """Two optimizer steps an epoch, each on half the images with both trained steps (the published
    structure); a step holds half of every group of 16 (blocks of 2 micro-batches of 8)."""
    cfg = T.parse_args([])
    assert step_chunks(cfg) == 2
    passes = T.training_passes(cfg, 0, 0, 96, torch.device("cpu"))
    first = {int(i) for mb, _ in passes[:len(passes) // 2] for i in mb}
    assert len(first) == 48 and all(len(first & set(range(g, g + 16))) == 8 for g in range(0, 96, 16))


def test_nft_draws_its_times_and_noise_per_image():
    """objective = "nft": an image's training times and the noise of its passes come from its own
    generator."""
    cfg = tiny_cfg(ADV_PRESET, objective="nft")
    cpu = torch.device("cpu")
    whole = nft.training_passes(cfg, nft.image_generators(cfg, 3, 0, 8), cpu)
    halves = [nft.training_passes(cfg, nft.image_generators(cfg, 3, r, 4), cpu) for r in (0, 1)]
    def times(passes, first=0):  # {image: its times, pass by pass}
        out = {}
        for mb, ts in passes:
            for i, t in zip(mb.tolist(), ts.tolist()):
                out.setdefault(first + i, []).append(t)
        return out
    assert times(whole) == {**times(halves[0]), **times(halves[1], 4)}
    assert all(len(set(t)) == len(t) == 3 for t in times(whole).values())  # 3 of the 4 times, no repeat
    eps = [torch.randn(3, generator=g) for g in nft.image_generators(cfg, 3, 1, 4)]
    assert all(torch.equal(e, torch.randn(3, generator=g))
               for e, g in zip(eps, nft.image_generators(cfg, 3, 0, 8)[4:]))


def test_the_adversary_draws_per_image(tmp_path):
    """Scoring the epoch's images as one rank or as two halves (ranks 0 and 1) gives the same rewards, the
    same references and the same discriminator loss: the patch tokens and the reference of an image are
    drawn from the image's own generator."""
    cfg = tiny_cfg(ADV_PRESET, d_patches=4)  # 4 of the 16 patch tokens of the tiny ViT
    prompts = data.load_prompts(cfg.train_prompts)
    refs = data.load_references(cfg, prompts)
    texts = [p["prompt"] for p in prompts[:2] for _ in range(4)]
    g = torch.Generator().manual_seed(0)
    batch = dict(images=torch.rand(8, 3, 32, 32, generator=g), pool=torch.zeros(8, 64))
    disc = R.build_adversary(cfg, torch.device("cpu"))

    def score(rank, part):
        half = {k: v[part] for k, v in batch.items()}
        mine = [{"prompt": t} for t in texts[part]]
        r, _, d_batch, _ = T.score_epoch(cfg, 5, rank, half, mine, None, disc, refs)
        return r, d_batch["real_feats"][0], disc.d_loss_from_features(
            d_batch["real_feats"], d_batch["fake_feats"], d_batch["generator"])[0]

    whole, halves = score(0, slice(0, 8)), [score(0, slice(0, 4)), score(1, slice(4, 8))]
    assert torch.allclose(whole[0], torch.cat([h[0] for h in halves]), atol=1e-6)       # rewards
    assert torch.allclose(whole[1], torch.cat([h[1] for h in halves]), atol=1e-6)       # the references
    assert abs(whole[2] - (halves[0][2] + halves[1][2]) / 2) < 1e-6                     # D loss (ranks' mean)
    other = T.score_epoch(cfg, 6, 0, batch, [{"prompt": t} for t in texts], None, disc, refs)[0]
    assert not torch.allclose(whole[0], other)                                # another epoch, other draws


@pytest.mark.slow  # ~35 s each: two interpreters start (the per-image draws and steps above are in make test)
@pytest.mark.parametrize("objective", ["grpo", "nft"])
def test_one_and_two_ranks_train_the_same_weights(tmp_path, objective):
    """The adversarial reward (patch draws, reference draws, D steps) and the generator's update (micro-batch
    order; nft: its times and noise too): one process and two gloo ranks end with the same LoRA and
    discriminator state, to float rounding."""
    two = _two_ranks(tmp_path, **RUN, objective=objective)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = tiny_cfg(ADV_PRESET, out_dir=str(tmp_path / "one"), **RUN, objective=objective)
        one = _state(*T.train(cfg)[:2])
    finally:
        torch.set_num_threads(threads)
    assert one.keys() == two.keys()
    far = {k: float((one[k] - two[k]).abs().max()) for k in one if not torch.allclose(one[k], two[k],
                                                                                      atol=1e-6, rtol=1e-5)}
    assert not far, f"{len(far)} of {len(one)} tensors differ, e.g. {sorted(far.items())[:3]}"
    init = R.build_adversary(tiny_cfg(ADV_PRESET), torch.device("cpu")).head.state_dict()
    assert any(not torch.equal(one[f"D.{k}"], v) for k, v in init.items())  # the discriminator trained


def _dying_worker(rank, world, port, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    if rank == 1:  # dies in its second epoch, as a killed or crashed process does
        score = T.score_epoch
        T.score_epoch = lambda cfg, epoch, *a, **k: os._exit(3) if epoch == 1 else score(cfg, epoch, *a, **k)
    try:
        T.main([ADV_PRESET, f"--out_dir={out_dir}/run", "--epochs=3", "--eval_every=0"])
        said = "finished"
    except SystemExit as e:
        said = str(e.code)
    torch.save(said, os.path.join(out_dir, f"rank{rank}.pt"))


def test_a_rank_that_dies_is_one_line_on_the_others(tmp_path):
    """gloo's 'Connection closed by peer' traceback on the surviving rank becomes one line saying that
    another rank stopped and where to look."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(mp.ProcessExitedException):  # rank 1's own exit
        mp.spawn(_dying_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    said = torch.load(tmp_path / "rank0.pt")
    assert said.startswith("rank 0: another rank stopped during a collective") and "\n" not in said, said


def test_any_other_runtime_error_keeps_its_cause(monkeypatch):
    """Only gloo's "by peer" becomes one line; another RuntimeError (e.g. a compile failure raised from
    its real cause) reaches the user with that cause, not stripped of it."""
    def failing(cfg):
        try:
            raise ValueError("the real cause")
        except ValueError as cause:
            raise RuntimeError("backend failed") from cause
    monkeypatch.setattr(T, "train", failing)
    with pytest.raises(RuntimeError, match="backend failed") as e:
        T.main(["config/tiny_random.py"])
    assert isinstance(e.value.__cause__, ValueError)  # `from None` had dropped it
