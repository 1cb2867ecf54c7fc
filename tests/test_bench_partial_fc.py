"""bench/bench_partial_fc.py's per-loss mode (docs/benchmarks.md's head step time per margin loss)."""
from bench import bench_partial_fc


def test_per_loss_mode_measures_every_loss_in_every_round_and_renders_ratios_to_combined():
    lines = []
    result = bench_partial_fc.run_losses(
        ["combined", "adaface"], [2_000], [0.5], batch=16, steps=1, warmup=1, rounds=2, log=lines.append,
    )
    assert len(lines) == 4  # 2 rounds x 2 losses, each measured in its own process
    assert [r["loss"] for r in result["cases"]] == ["combined", "adaface"]
    for case in result["cases"]:
        assert case["rounds"] == 2 and len(case["times_s"]) == 2 and case["min_s"] > 0
        assert case["impl"] == "ours" and case["num_classes"] == 2_000
    table = bench_partial_fc.format_loss_table(result).splitlines()
    assert len(table) == 4 and "| combined |" in table[2] and "1.00x" in table[2] and "| adaface |" in table[3]
