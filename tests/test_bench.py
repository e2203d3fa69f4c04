"""bench.py: the real loop timed stage by stage on the tiny arch (CPU), and the FLOP counter checked
against arithmetic we can do by hand."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import bench
import sampler


@pytest.fixture
def one_thread():
    # 2 shared cores: with 2 OpenMP threads a busy neighbour process slows these tiny ops 100-fold
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_tiny_run_times_every_stage_and_counts_flops(tmp_path, one_thread):
    out = tmp_path / "bench.json"
    res = bench.main(["--arch=tiny", "--epochs=1", "--warmup_epochs=0", f"--out={out}"])
    r, f = res["eager"], res["flops"]
    assert set(r["stages"]) == {*bench.STAGES, "epoch"}
    for name, s in r["stages"].items():
        assert s["seconds"] > 0 and s["images_per_s"] > 0, (name, s)
    for name in ("sample", "decode", "reward", "g_step", "epoch"):
        s = r["stages"][name]
        assert s["tflop"] > 0 and s["tflops"] > 0 and s["mfu"] > 0, (name, s)
    # rows are disjoint: the epoch is their sum
    assert abs(sum(r["stages"][k]["seconds"] for k in bench.STAGES) - r["stages"]["epoch"]["seconds"]) < 1e-9
    assert f["sample_forward"] > 0 and f["train_forward"] > 0
    # forward+backward with frozen base weights: ≈ 2× (input gradients) plus LoRA's weight gradients,
    # attention backward 2.5×; never 1× (backward not counted) nor ≫ 3× (recomputation counted)
    assert 2.0 <= f["train_forward_backward"] / f["train_forward"] <= 3.5
    # FLOPs are linear in the batch: the sampling forward (2×4 rows) costs what the training one (2×2) does
    # per row
    assert f["sample_forward"] / f["sample_rows"] == pytest.approx(f["train_forward"] / f["train_rows"],
                                                                   rel=1e-6)
    assert json.loads(out.read_text())["eager"]["stages"].keys() == r["stages"].keys()
    # the wrapped callees are put back
    assert sampler.decode_latents.__name__ == "decode_latents"


def test_cpu_attention_is_counted():
    q, k, v = torch.randn(2, 3, 40, 8), torch.randn(2, 3, 50, 8), torch.randn(2, 3, 50, 8)
    # QKᵀ and AV
    assert bench.count(lambda: F.scaled_dot_product_attention(q, k, v)) == 2 * 2 * 2 * 3 * 40 * 50 * 8


def test_parser_routes_bench_and_train_keys():
    b, cfg = bench.parse(["--arch=tiny", "--epochs=3", "--resolution=64", "--compile", "--out=x.json"])
    assert (b.epochs, b.out, cfg.resolution, cfg.compile) == (3, "x.json", 64, True)
    assert cfg.epochs == 1000 and cfg.prompts_per_epoch * cfg.group_size == 8   # train's own epochs untouched
    b, cfg = bench.parse(["--arch=tiny", "--low_mem"])
    assert cfg.low_mem and cfg.gradient_checkpointing
    ns = {}  # bench --low_mem measures exactly what config/sd35m_24gb.py sets
    exec(open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config",
                           "sd35m_24gb.py")).read(), ns)
    assert {k: v for k, v in ns.items() if not k.startswith("__")} == bench.LOW_MEM
    with pytest.raises(SystemExit, match="arch must be one of"):
        bench.parse(["--arch=huge"])
    with pytest.raises(SystemExit, match="unknown config key 'warmup_epoch'"):
        bench.parse(["--arch=tiny", "--warmup_epoch=2"])
    with pytest.raises(SystemExit, match="peak_tflops must be float"):
        bench.parse(["--arch=tiny", "--peak_tflops=fast"])


def test_nested_stage_passes_its_peak_memory_to_the_enclosing_one(monkeypatch):
    """CUDA's peak statistic is one global counter; the inner region's reset must not hide its peak from
    the outer region. A fake allocator stands in for the GPU."""
    mem = dict(now=0, peak=0)

    def alloc(n):
        mem["now"] = n
        mem["peak"] = max(mem["peak"], n)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: mem["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: mem.update(peak=mem["now"]))
    st = bench.Stages(torch.device("cuda"))
    alloc(70)                                 # before anything: must not count
    alloc(10)
    with st("outer"):
        alloc(20)
        with st("inner"):
            alloc(50)
            alloc(30)
        alloc(25)
    with st("next"):
        alloc(15)
    assert (st.peak["inner"], st.peak["outer"], st.peak["next"]) == (50, 50, 25)


@pytest.mark.slow
def test_sd35_medium_flops_match_the_earlier_h200_figure():
    """An earlier H200 measurement (docs/PERF.md §3.2) gave ≈ 2.22 TFLOP per forward row at 512² with 205 text
    tokens; our count adds LoRA r32 (≈ 1 %). Counted on shape-only tensors: no memory, ~15 s on 2 cores."""
    f = bench.main(["--arch=sd3.5-medium", "--count_only"])["flops"]
    assert 2.2e12 < f["forward_per_row"] < 2.3e12
    # LoRA: no weight gradients for the base
    assert 1.9 < f["train_forward_backward"] / f["train_forward"] < 2.5
    assert 2.0e12 < f["decode_per_image"] < 3.0e12 and 0.25e12 < f["dino_per_image"] < 0.35e12


@pytest.mark.slow
def test_eager_baseline_runs_both_variants(one_thread):
    res = bench.main(["--arch=tiny", "--eager_baseline", "--epochs=1", "--warmup_epochs=1"])
    assert res["eager"]["compile"] is False and res["compiled"]["compile"] is True
    assert res["compiled"]["stages"]["g_step"]["seconds"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_reports_peak_memory():
    r = bench.main(["--arch=tiny", "--epochs=1", "--warmup_epochs=1"])["eager"]
    assert all(s["peak_gib"] > 0 for s in r["stages"].values())
