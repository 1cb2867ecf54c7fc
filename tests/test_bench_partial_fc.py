"""bench/bench_partial_fc.py's per-loss mode (docs/benchmarks.md's head step time per margin loss)."""
from bench import bench_partial_fc


def test_per_loss_mode_measures_every_loss_in_every_round_and_renders_ratios_to_combined():
    lines = []
    # One loss, two rounds: each measurement is a fresh process (peak memory), so this stays small.
    result = bench_partial_fc.run_losses(["combined"], [2_000], [0.5], batch=16, steps=1, warmup=1, rounds=2,
                                         fc_state_dtype="bfloat16", log=lines.append)
    assert len(lines) == 2  # 2 rounds x 1 loss, each measured in its own process
    (case,) = result["cases"]
    assert case["loss"] == "combined" and case["impl"] == "ours" and case["num_classes"] == 2_000
    assert case["fc_state_dtype"] == "bfloat16"  # the measuring process was given the option
    assert case["rounds"] == 2 and len(case["times_s"]) == 2 and case["min_s"] == min(case["times_s"]) > 0
    adaface = dict(case, loss="adaface", min_s=2 * case["min_s"])  # the table's ratio is to combined's time
    table = bench_partial_fc.format_loss_table({**result, "losses": ["combined", "adaface"],
                                                "cases": [case, adaface]}).splitlines()
    assert len(table) == 4 and "| combined |" in table[2] and "1.00x" in table[2]
    assert "| adaface |" in table[3] and "2.00x" in table[3]


def test_the_benchmark_page_renders_the_other_measurements_and_ignores_them_as_devices(tmp_path):
    import json

    from bench import report

    results = tmp_path / "results"
    (results / "extra").mkdir(parents=True)
    (results / "extra" / "loss_demo.json").write_text(json.dumps({"date": "2026-12-01", "results": [
        {"name": "combined", "args": [], "before": 67.33, "steps": 150, "after": 91.33},
        {"name": "adaface", "args": ["--loss=adaface"], "before": 67.33, "steps": 150, "after": 92.0},
    ]}))
    (results / "extra" / "distill_cost_cpu.json").write_text(json.dumps({
        "device": "cpu", "precision": "bf16", "student": "mbf", "teacher": "r50", "batch_size": 16,
        "without_teacher": {"samples_per_s": 12.0}, "with_teacher": {"samples_per_s": 4.0}, "slowdown": 3.0,
    }))
    md = report.render(results, tmp_path / "docs").read_text()
    assert "## Other measurements" in md and "No results yet" in md  # no device file: the extras are no device
    assert "| adaface | `--loss=adaface` | 67.33% | 92.00% (150) |" in md
    assert "| mbf | r50 | 12.0 | 4.0 | 3.00x |" in md


def test_the_suite_measures_bfloat16_state_and_the_page_judges_its_goals(tmp_path):
    import torch

    from bench import run_all

    plan = {"partial_fc_bf16_state": dict(classes=[2_000], sample_rates=[0.5], batch_sizes=[16], steps=1, warmup=1)}
    saved = []
    results = run_all.run_suite(torch.device("cpu"), plan, ["partial_fc_bf16_state"], saved.append,
                                log=lambda *_: None)
    part = results["partial_fc_bf16_state"]
    assert saved and "error" not in part, part
    ours = [c for c in part["cases"] if c["impl"] == "ours"]
    reference = [c for c in part["cases"] if c["impl"] == "reference"]
    assert ours and reference and all(c["fc_state_dtype"] == "bfloat16" for c in ours)
    assert all(c["fc_state_dtype"] == "float32" for c in reference)  # the reference keeps float32 momentum

    # The goals are judged at 1M classes, rate 0.1: the same result file relabelled to that size.
    for c in part["cases"]:
        c.update(num_classes=1_000_000, sample_rate=0.1)
    part.update(classes=[1_000_000], sample_rates=[0.1])
    md = _render_page(tmp_path, "partial_fc_bf16_state", part)
    assert "### (b2) PartialFC step with bfloat16 class-centre state" in md
    ratio = ours[0]["peak_bytes"] / reference[0]["peak_bytes"]
    status = "PASS" if ratio <= 0.40 else "MISS"
    assert f"| PartialFC 1M classes, rate 0.1, bfloat16 state: peak memory | <= 0.40x dense | {ratio:.3f}x" in md
    assert status in md.split("bfloat16 state: peak memory", 1)[1].splitlines()[0]


def test_the_suite_measures_the_chunked_head_and_the_page_shows_it(tmp_path):
    import torch

    from bench import run_all

    plan = {"partial_fc_chunked": dict(classes=[2_000], sample_rates=[0.5], batch_sizes=[64], steps=1, warmup=1,
                                       logits_chunk_rows=16)}
    results = run_all.run_suite(torch.device("cpu"), plan, ["partial_fc_chunked"], lambda _: None,
                                log=lambda *_: None)
    part = results["partial_fc_chunked"]
    assert "error" not in part, part
    by_impl = {c["impl"]: c for c in part["cases"]}
    assert set(by_impl) == {"ours", "reference", "ours_chunked"}
    assert by_impl["ours_chunked"]["logits_chunk_rows"] == 16  # the measuring process was given the option
    assert "logits_chunk_rows" not in by_impl["ours"]
    md = _render_page(tmp_path, "partial_fc_chunked", part)
    assert "### (b3) PartialFC with the logits a block of rows at a time" in md
    ours, chunked = by_impl["ours"], by_impl["ours_chunked"]
    row = [line for line in md.splitlines() if line.startswith("| 64 | 2,000 | 0.5 |") and "x |" in line][-1]
    assert f"| {chunked['min_s'] / ours['min_s']:.2f}x |" in row
    assert f"| {chunked['peak_bytes'] / ours['peak_bytes']:.2f}x |" in row


def _render_page(tmp_path, name, part):
    """docs/benchmarks.md rendered from one CPU results file holding only the part `name`."""
    import json

    from bench import report

    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "cpu_avx512_bf16.json").write_text(json.dumps({
        name: part, "machine": {"date": "d", "cpu": "x", "cpu_cores": 2}}))
    return report.render(folder, tmp_path / "docs").read_text()
