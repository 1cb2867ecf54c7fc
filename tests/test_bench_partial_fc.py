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
