"""bench/bench_train.py, its part of bench/run_all.py and its rendering by bench/report.py:
the insightface path (skipped on a CPU, with its reason), MFU for every path, and result
files from before those fields existed."""
import json
from pathlib import Path

import pytest
import torch

from bench import bench_train, report, run_all
from bench.insightface_reference import count_step_flops

CPU = torch.device("cpu")
BATCH = 4


@pytest.fixture(scope="module")
def cpu_train():
    """run_all's train part on the CPU with a tiny plan: mbf, batch 4, one warm-up + one timed step."""
    plan = {"train": dict(models=["mbf"], batch=[BATCH], steps=1, warmup=1, compiled=[],
                          paths=["reference", "insightface", "default"])}
    saved = []
    results = run_all.run_suite(CPU, plan, ["train"], saved.append, log=lambda *_: None)
    assert saved and "error" not in results["train"], results["train"]
    return results["train"]


def test_cpu_run_skips_insightface_with_its_reason_and_reports_mfu_of_every_path(cpu_train):
    (model,) = cpu_train["models"]
    assert model["model"] == "mbf" and model["batch_per_process"] == BATCH
    # insightface's fp16 flag is CUDA autocast: on a CPU the path would be the reference again.
    assert set(model["paths"]) == {"reference", "default"}
    assert "CUDA only" in model["skipped_paths"]["insightface"]
    # One FLOP count for every path, taken on the reference's warm-up step: about 3 forwards
    # (mbf: ~0.88 GFLOP per 112x112 image forward), plus the head's three matmuls.
    assert model["flops_counted_on"] == "reference"
    head = 3 * 2 * BATCH * 512 * bench_train.NUM_CLASSES
    assert 2.5 * 0.8e9 * BATCH + head < model["step_flops"] < 3 * 0.95e9 * BATCH + head
    for kind, entry in model["paths"].items():
        assert 0.0 < entry["mfu"] <= 1.0, (kind, entry["mfu"])
        assert entry["mfu"] == pytest.approx(model["step_flops"] / entry["min_s"] / entry["mfu_peak_flops"])
        # A CPU has no datasheet peak: the measured ceiling in the path's dtype, named.
        assert entry["mfu_peak"].startswith(f"measured {entry['mfu_peak_flops'] / 1e9:,.0f} GFLOP/s "
                                            f"{entry['precision']}: the faster of a 2048^2 GEMM")
    table = bench_train.format_table(cpu_train)
    assert "| insightface samples/s |" in table and "| skipped |" in table
    assert "insightface skipped: CUDA only" in table
    for kind, entry in model["paths"].items():
        assert f"{100 * entry['mfu']:.1f}%" in table and entry["mfu_peak"] in table


def test_cpu_report_renders_the_mfu_columns(cpu_train, tmp_path):
    results, docs = tmp_path / "results", tmp_path / "docs"
    results.mkdir()
    (results / "cpu.json").write_text(json.dumps({"train": cpu_train, "machine": {"date": "today", "cpu_cores": 2}}))
    md = report.render(results, docs).read_text()
    assert "| reference MFU | default MFU |" in md.replace(" insightface MFU |", "")
    assert "FlopCounterMode" in md and "measured" in md and "insightface skipped" in md


def test_insightface_path_in_fp32_on_a_cpu_is_the_reference_step():
    # The docstring's reason for skipping it on a CPU, checked: with fp16 off (what its flag
    # does on a CPU) the insightface step starts from the reference's loss and follows it
    # (its ArcFace gradient treats the margin as a constant, so later steps differ a little).
    result = bench_train.run(["mbf"], batch=BATCH, steps=1, warmup=1, paths=("reference", "insightface"),
                             device="cpu", insightface_fp16=False, profile=False, log=lambda *_: None)
    (model,) = result["models"]
    reference, insightface = model["paths"]["reference"], model["paths"]["insightface"]
    assert insightface["precision"] == "fp32" and "skipped_paths" not in model
    assert insightface["losses"][0] == pytest.approx(reference["losses"][0], rel=1e-5)
    assert insightface["max_rel_loss_diff"] < 0.02
    assert 0.0 < insightface["mfu"] <= 1.0


def test_every_path_does_the_same_model_flops(cpu_train):
    # Why one count serves every path: the FLOPs of a step are the model's, whatever the
    # path's precision, memory format, head implementation or optimizer. The run counted
    # them on the reference's first step; count them on the others' (same weights, batch).
    # The default path's CPU convolution routes (backbones.conv) multiply zeros as well,
    # which are not the model's FLOPs: it is counted with torch's modules, and once as it runs.
    from backbones import get_model
    from bench.insightface_reference import stock_modules
    from utils.distributed import cleanup_distributed, init_distributed

    ctx = init_distributed(device="cpu")
    try:
        torch.manual_seed(0)
        backbone = get_model("mbf", num_features=512)
        head_weight = torch.normal(0.0, 0.01, (bench_train.NUM_CLASSES, 512))
        images, labels = bench_train._make_batches(1, BATCH, bench_train.NUM_CLASSES, seed=1, pin=False)[0]
        counts = {"reference": cpu_train["models"][0]["step_flops"]}
        for kind in ("default", "insightface"):
            runner = bench_train._Path(kind, "mbf", backbone, head_weight, ctx, CPU, insightface_fp16=False)
            if kind == "default":
                routed = count_step_flops(runner.step, images, labels)
                with stock_modules(runner.backbone):
                    counts[kind] = count_step_flops(runner.step, images, labels)
                assert type(runner.backbone.layers[1].layers[0]).__module__ == "backbones.conv"  # restored
            else:
                counts[kind] = count_step_flops(runner.step, images, labels)
            assert float(runner.losses[0]) == pytest.approx(cpu_train["models"][0]["paths"]["reference"]["losses"][0],
                                                     rel=0.02)  # the same first step
    finally:
        cleanup_distributed()
    assert len(set(counts.values())) == 1, counts
    assert routed > counts["reference"]  # the block-diagonal weights' zeros


def test_warmup_is_needed_for_the_flop_count():
    with pytest.raises(ValueError, match="warmup"):
        bench_train.run(["mbf"], batch=2, steps=1, warmup=0, paths=("reference",), device="cpu", log=lambda *_: None)


def _path(samples_per_s, precision, **extra):
    return {"min_s": 128 / samples_per_s, "median_s": 128 / samples_per_s, "steps": 8, "samples_per_s": samples_per_s,
            "precision": precision, "losses": [44.0, 43.5], **extra}


def test_old_result_files_render_dashes_for_the_new_fields(tmp_path):
    # Result files written before the insightface path and MFU existed.
    old = {"model": "r50", "batch_per_process": 128, "world_size": 1, "warmup": 3, "paths": {
        "reference": _path(1667.6, "fp32"),
        "default": _path(4600.0, "fp16", max_rel_loss_diff=0.0046, speedup=2.76),
    }}
    results, docs = tmp_path / "results", tmp_path / "docs"
    results.mkdir()
    for kind in ("cpu", "cuda"):
        (results / f"{kind}.json").write_text(json.dumps({
            "train": {"models": [old], "num_classes": 10_000, "steps": 8, "warmup": 3},
            "machine": {"date": "2026-11-23 07:48 UTC", "cpu_cores": 16},
        }))
    md = report.render(results, docs).read_text()
    assert md.count("| r50 | 128 | 1667.6 (fp32) | 4600.0 (fp16) | — | — |") == 2  # samples/s, then no MFU
    assert md.count("| r50 | 128 | 2.76x | 0.46% |") == 2
    # The GPU goals on the CUDA section: not measured in such a file, said so.
    assert "| r50 batch 128: training step vs insightface's GPU path | >= 1.3x samples/s | — | — |" in md
    assert "| r50 batch 128: MFU of our step | >= 25% | — | — | no MFU in this result file |" in md
    assert md.count("MFU of our step") == 1  # the CPU section has no GPU goals


def test_cuda_result_renders_insightface_ratios_and_judges_the_gpu_goals(tmp_path):
    peak = "H100 SXM, dense fp16/bf16 (989 TFLOP/s)"
    flops = 3 * 6.3e9 * 2 * 128
    rows = []
    for batch, ours, theirs in ((128, 4600.0, 3000.0), (256, 5000.0, 4500.0)):
        paths = {"reference": _path(1667.6, "fp32"), "insightface": _path(theirs, "fp16"),
                 "default": _path(ours, "fp16")}
        for entry in paths.values():
            entry["mfu"] = flops / entry["min_s"] / 989.4e12
            entry["mfu_peak"] = peak
        bench_train._add_ratios(paths)
        rows.append({"model": "r50", "batch_per_process": batch, "world_size": 1, "warmup": 3, "paths": paths,
                     "step_flops": flops, "flops_counted_on": "reference"})
    train = {"models": rows, "num_classes": 10_000, "steps": 8, "warmup": 3}
    assert rows[0]["paths"]["default"]["speedup_vs_insightface"] == pytest.approx(4600 / 3000)
    results, docs = tmp_path / "results", tmp_path / "docs"
    results.mkdir()
    (results / "cuda.json").write_text(json.dumps({"train": train, "machine": {
        "date": "d", "gpu": "NVIDIA H100 80GB HBM3", "gpu_count": 1, "gpu_memory_gib": 79.2}}))
    md = report.render(results, docs).read_text()
    assert "| default vs insightface |" in md
    # vs eager fp32 (insightface, default), default vs insightface, the loss differences
    assert "| r50 | 128 | 1.80x | 2.76x | 1.53x | 0.00% | 0.00% |" in md
    mfu_128 = 100 * rows[0]["paths"]["default"]["mfu"]
    assert f"| r50 batch 128: MFU of our step | >= 25% | default {mfu_128:.1f}% | MISS |" in md
    assert "| r50 batch 128: training step vs insightface's GPU path" in md
    goal_rows = [line for line in md.splitlines() if "vs insightface's GPU path" in line]
    assert [row.split(" | ")[3] for row in goal_rows] == ["PASS", "MISS"]  # 1.53x, then 1.11x
    assert "MFU: the step's FLOPs counted once per model and batch on the reference path" in md and peak in md


def test_each_cpu_kind_has_its_own_results_file_and_section(tmp_path):
    # The kernels held to AVX2 (what `make bench-avx2` sets), in a fresh process: the kind,
    # hence the results file, and precision=auto's choice follow the limit.
    import os
    import subprocess
    import sys

    code = ("import torch; from bench.common import cpu_kind, isa_limits; from bench.run_all import results_kind; "
            "from bench.common import default_precision as p; "
            "print(results_kind(torch.device('cpu')), sorted(isa_limits()), p(torch.device('cpu')).name)")
    # The hold as `make bench-avx2` sets it, read from the Makefile: every variable it sets is one
    # the results record (bench.common.ISA_LIMITS), and the other way round.
    from bench.common import ISA_LIMITS

    makefile = (run_all.ROOT / "Makefile").read_text()
    hold = dict(item.split("=", 1) for item in
                next(line for line in makefile.splitlines() if line.startswith("AVX2_ONLY :=")).split()[2:])
    assert sorted(hold) == sorted(ISA_LIMITS)
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **hold}, capture_output=True, text=True,
                         cwd=run_all.ROOT, check=True).stdout.split()
    assert out == ["cpu_avx2", *str(sorted(ISA_LIMITS)).split(), "fp32"]

    old = {"model": "mbf", "batch_per_process": 32, "world_size": 1, "warmup": 2, "paths": {
        "reference": _path(20.0, "fp32"), "default": _path(30.0, "fp32", speedup=1.5)}}
    results, docs = tmp_path / "results", tmp_path / "docs"
    results.mkdir()
    for kind, limits, cpu in (("cpu_avx2", {"ONEDNN_MAX_CPU_ISA": "AVX2"}, "Some Xeon"),
                              ("cpu_avx512_bf16", {}, "Some EPYC"), ("cpu_amx_bf16", {}, "Some Xeon")):
        (results / f"{kind}.json").write_text(json.dumps({
            "train": {"models": [old], "num_classes": 10_000, "steps": 4, "warmup": 2},
            "machine": {"date": "d", "cpu": cpu, "cpu_cores": 2, "cpu_matrix_units": "amx_bf16",
                        "isa_limits": limits}}))
    md = report.render(results, docs).read_text()
    titles = [line for line in md.splitlines() if line.startswith("## ")]
    assert titles[:3] == [
        "## CPU with AMX (bf16 matrix tiles): the default path is bf16 autocast",
        "## CPU with AVX512-BF16, no AMX: the default path is bf16 autocast",
        "## CPU with AVX2 only: the default path is fp32 (emulated: ONEDNN_MAX_CPU_ISA=AVX2 on Some Xeon with amx_bf16)",
    ]


def test_cpus_with_and_without_amx_have_results_files_of_their_own():
    # Sapphire Rapids (AMX) and Zen 4 (AVX512-BF16 only) both default to bf16, at very different
    # speeds: each kind has its own file. oneDNN held below AMX is the kind without it.
    import os
    import subprocess
    import sys

    from bench.common import cpu_matrix_units
    from utils.amp import bf16_is_fast

    code = "from bench.common import cpu_kind; print(cpu_kind())"

    def kind(**limits):
        env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
        return subprocess.run([sys.executable, "-c", code], env={**env, **limits}, capture_output=True, text=True,
                              cwd=run_all.ROOT, check=True).stdout.strip()

    has_amx = "amx_bf16" in cpu_matrix_units().split()
    if not bf16_is_fast(torch.device("cpu")):
        assert kind() in ("cpu_avx512", "cpu_avx2", "cpu_default")
    else:
        assert kind() == ("cpu_amx_bf16" if has_amx else "cpu_avx512_bf16")
        assert kind(ONEDNN_MAX_CPU_ISA="AVX512_CORE_BF16") == "cpu_avx512_bf16"


def test_the_compiled_path_is_timed_with_torch_compiles_caches_empty():
    # A rerun on the same machine would otherwise find the kernels of the run before and
    # report a third of a first run's compile time.
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    outside = cache_dir()
    cold, what = bench_train._cold_compile_cache()
    assert what == "empty"
    with cold:
        inside = cache_dir()
        assert inside != outside
        assert not any(Path(inside).rglob("*")), "the cache the compiled path sees is not empty"
    assert cache_dir() == outside


def test_report_says_whether_the_compile_time_was_a_first_runs(tmp_path):
    results, docs = tmp_path / "results", tmp_path / "docs"
    results.mkdir()
    rows = []
    for model, cache in (("r50", "empty"), ("r18", "as found"), ("mbf", None)):
        compiled = _path(9.2, "bf16", warmup_seconds_incl_compile=95.0, **({"compile_cache": cache} if cache else {}))
        paths = {"reference": _path(3.0, "fp32"), "compiled": compiled}
        bench_train._add_ratios(paths)
        rows.append({"model": model, "batch_per_process": 32, "world_size": 1, "warmup": 2, "paths": paths})
    (results / "cpu.json").write_text(json.dumps({"train": {"models": rows, "num_classes": 10_000, "steps": 4,
                                                            "warmup": 2}, "machine": {"date": "d", "cpu_cores": 2}}))
    md = report.render(results, docs).read_text()
    assert ("torch.compile of r50 (batch 32): the 2 warm-up steps took 95 s (inductor's caches empty, as on a "
            "first compile=True run).") in md
    assert "torch.compile of r18 (batch 32): the 2 warm-up steps took 95 s (inductor's caches as found" in md
    assert "torch.compile of mbf (batch 32): the 2 warm-up steps took 95 s." in md  # files from before the field
