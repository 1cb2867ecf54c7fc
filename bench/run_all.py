"""Run the whole benchmark suite on one device and regenerate docs/benchmarks.md.

    python bench/run_all.py                    # CPU (or `make bench`)
    make bench-avx2                            # on an AVX512/AMX CPU: the AVX2-only CPU's code paths
    python bench/run_all.py --device cuda      # a CUDA machine: the same suite at GPU sizes
    python bench/run_all.py --render-only      # rebuild docs/benchmarks.md from the saved results
    python bench/run_all.py --quick            # smoke test: tiny sizes, written under bench/results/

Each kind of machine's results go to docs/bench_results/<kind>.json: cuda, or the CPU's kind
(cpu_amx_bf16, cpu_avx512_bf16, cpu_avx512, cpu_avx2; bench.common.cpu_kind). They are kept in the
repository, so results measured on different machines are rendered side by side; the
markdown and one PNG per kind are rendered from whichever result files exist.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script
    import _repo_path  # noqa: F401  (puts the repository root on sys.path)

from bench.common import OtherLoad, ROOT, cpu_kind, cpu_model, enable_huge_pages, machine_info, resolve_device  # noqa: E402

DOCS = ROOT / "docs"
QUICK_DIR = ROOT / "bench" / "results"

# Sizes per device kind. The CPU suite takes ~15 min on 2 cores; the CUDA one ~10 minutes on
# one GPU (the GPU sizes follow insightface's: 128 images per GPU, and 256). train: every
# model at every batch size (`batch`: one or a list) with the `paths` (default: reference,
# default, compiled); the compiled path only for the models in `compiled`. bench_train
# skips the insightface path on a CPU (there it is the eager fp32 reference).
TRAIN_PATHS = ("reference", "default", "compiled")
PLANS = {
    "cpu": {
        "train": dict(models=["mbf", "r18", "r50"], batch=32, steps=4, warmup=2, compiled=["r50"]),
        "partial_fc": dict(classes=[100_000, 1_000_000, 2_000_000], sample_rates=[1.0, 0.3, 0.1],
                           batch_sizes=[128], steps=3, warmup=1, rounds=2),
        # fc_state_dtype="bfloat16" (issue 15's ratios) at the goal's size only.
        "partial_fc_bf16_state": dict(classes=[1_000_000], sample_rates=[0.1], batch_sizes=[128], steps=3, warmup=1,
                                      rounds=2),
        # logits_chunk_rows at a global batch of 2048 (16 GPUs x 128): what computing the logits a
        # block of rows at a time costs and saves, against the whole batch's logits.
        "partial_fc_chunked": dict(classes=[300_000], sample_rates=[0.1], batch_sizes=[2048], steps=3, warmup=1,
                                   rounds=2, logits_chunk_rows=256),
        "inference": dict(models=["mbf", "r18", "r50"], batch=32, batches=5, warmup=1),
        "data": dict(num_images=3000, workers=(0, 1, 2)),
    },
    "cuda": {
        "train": dict(models=["r50", "r100"], batch=[128, 256], steps=8, warmup=3, compiled=["r50", "r100"],
                      paths=["reference", "insightface", "default", "compiled"]),
        "partial_fc": dict(classes=[100_000, 1_000_000, 2_000_000, 4_000_000], sample_rates=[1.0, 0.3, 0.1],
                           batch_sizes=[128, 1024], steps=8, warmup=2),
        "partial_fc_bf16_state": dict(classes=[1_000_000], sample_rates=[0.1], batch_sizes=[128], steps=8, warmup=2),
        # 64 GPUs x 128: the global batch of issue 15's 1B identities.
        "partial_fc_chunked": dict(classes=[1_000_000], sample_rates=[0.1], batch_sizes=[8192], steps=6, warmup=2,
                                   logits_chunk_rows=256),
        "inference": dict(models=["mbf", "r18", "r50"], batch=128, batches=6, warmup=2),
        "data": dict(num_images=3000, workers=(0, 1, 2)),
    },
    "quick": {
        "train": dict(models=["mbf"], batch=8, steps=2, warmup=1, compiled=[],
                      paths=["reference", "insightface", "default"]),
        "partial_fc": dict(classes=[5_000, 20_000], sample_rates=[1.0, 0.1], batch_sizes=[64], steps=2, warmup=1),
        "partial_fc_bf16_state": dict(classes=[20_000], sample_rates=[0.1], batch_sizes=[64], steps=2, warmup=1),
        "partial_fc_chunked": dict(classes=[20_000], sample_rates=[0.1], batch_sizes=[256], steps=2, warmup=1,
                                   logits_chunk_rows=64),
        "inference": dict(models=["mbf"], batch=8, batches=2, warmup=1),
        "data": dict(num_images=300, workers=(0, 1)),
    },
}
SUITES = ("train", "partial_fc", "partial_fc_bf16_state", "partial_fc_chunked", "inference", "data")


def results_path(device_kind: str, quick: bool) -> Path:
    return (QUICK_DIR if quick else DOCS / "bench_results") / f"{device_kind}.json"


def results_kind(device) -> str:
    """One results file per kind of machine: cuda, or the CPU's kind (bench.common.cpu_kind),
    so the figures of an AVX2-only CPU do not replace those of a bf16 one."""
    return cpu_kind() if device.type == "cpu" else device.type


def run_suite(device, plan: dict, only, save, log=print) -> dict:
    """Run the parts in `only`; save(results) after each, so a run cut short keeps what it measured.
    A part that fails is recorded with its error and the others still run."""
    import traceback

    from bench import bench_data, bench_inference, bench_partial_fc, bench_train

    def train():
        p = plan["train"]
        batches = p["batch"] if isinstance(p["batch"], (list, tuple)) else [p["batch"]]
        log(f"[train] {p['models']} batch {batches}")
        models = []
        for name in p["models"]:
            paths = tuple(k for k in p.get("paths", TRAIN_PATHS) if k != "compiled" or name in p["compiled"])
            for batch in batches:
                kwargs = dict(batch=batch, steps=p["steps"], warmup=p["warmup"], device=str(device), log=log)
                try:
                    models += bench_train.run([name], paths=paths, **kwargs)["models"]
                except Exception as exc:
                    if "compiled" not in paths:
                        raise
                    # torch.compile needs a working compiler tool chain; the eager paths are still worth having.
                    log(f"  {name}: the compiled path failed ({type(exc).__name__}: {exc}); measuring without it")
                    eager = tuple(k for k in paths if k != "compiled")
                    result = bench_train.run([name], paths=eager, **kwargs)["models"][0]
                    result["compile_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                    models.append(result)
        return {"models": models, "num_classes": bench_train.NUM_CLASSES, "steps": p["steps"], "warmup": p["warmup"]}

    def partial_fc():
        p = plan["partial_fc"]
        log(f"[partial_fc] classes {p['classes']} rates {p['sample_rates']} batch {p['batch_sizes']}")
        return bench_partial_fc.run(p["classes"], p["sample_rates"], batch_sizes=p["batch_sizes"], steps=p["steps"],
                                    warmup=p["warmup"], rounds=p.get("rounds", 1), device=str(device), log=log)

    def partial_fc_bf16_state():
        p = plan["partial_fc_bf16_state"]
        log(f"[partial_fc_bf16_state] classes {p['classes']} rates {p['sample_rates']} batch {p['batch_sizes']}")
        return bench_partial_fc.run(p["classes"], p["sample_rates"], batch_sizes=p["batch_sizes"], steps=p["steps"],
                                    warmup=p["warmup"], rounds=p.get("rounds", 1), device=str(device), log=log,
                                    fc_state_dtype="bfloat16")

    def partial_fc_chunked():
        p = plan["partial_fc_chunked"]
        log(f"[partial_fc_chunked] classes {p['classes']} rates {p['sample_rates']} batch {p['batch_sizes']} "
            f"logits_chunk_rows {p['logits_chunk_rows']}")
        return bench_partial_fc.run(p["classes"], p["sample_rates"], batch_sizes=p["batch_sizes"], steps=p["steps"],
                                    warmup=p["warmup"], rounds=p.get("rounds", 1), device=str(device), log=log,
                                    impls=(*bench_partial_fc.IMPLS, bench_partial_fc.CHUNKED),
                                    logits_chunk_rows=p["logits_chunk_rows"])

    def inference():
        p = plan["inference"]
        log(f"[inference] {p['models']} batch {p['batch']}")
        return bench_inference.run(p["models"], batch=p["batch"], batches=p["batches"], warmup=p["warmup"],
                                   device=str(device), log=log)

    def data():
        p = plan["data"]
        log(f"[data] {p['num_images']} JPEGs, workers {p['workers']}")
        return bench_data.run(p["num_images"], workers=tuple(p["workers"]))

    parts = {"train": train, "partial_fc": partial_fc, "partial_fc_bf16_state": partial_fc_bf16_state,
             "partial_fc_chunked": partial_fc_chunked, "inference": inference, "data": data}
    results = {}
    for name in SUITES:
        if name not in only:
            continue
        start, other_load = time.perf_counter(), OtherLoad()
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        try:
            results[name] = parts[name]()
        except Exception as exc:  # keep going: the other parts are still worth having
            traceback.print_exc()
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        # Parts may be re-run on their own (--only): each carries when and how it was measured.
        results[name]["measured"] = {"date": date, "seconds": round(time.perf_counter() - start),
                                     "other_processes_cores": other_load.cores(), "cpu": cpu_model()}
        log(f"[{name}] {time.perf_counter() - start:.0f} s")
        save(results)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    parser.add_argument("--quick", action="store_true", help="tiny sizes; results under bench/results/, docs untouched")
    parser.add_argument("--only", nargs="+", choices=SUITES, default=list(SUITES), help="run only these parts")
    parser.add_argument("--render-only", action="store_true", help="do not measure; render the saved results")
    parser.add_argument("--note", default=None, help="a remark printed with this device's results")
    args = parser.parse_args()
    enable_huge_pages()  # as train.py does

    from bench.report import render

    if not args.render_only:
        device = resolve_device(args.device)
        plan = PLANS["quick" if args.quick else device.type]
        out = results_path(results_kind(device), args.quick)
        previous = json.loads(out.read_text()) if out.exists() else {}
        info = machine_info(device)
        other_load = OtherLoad()
        start = time.perf_counter()
        kept = {k: v for k, v in previous.items() if k in SUITES}  # a partial run (--only) keeps the rest
        for part in kept.values():  # sections from before "measured" named the CPU: the previous run's
            if isinstance(part.get("measured"), dict) and "cpu" not in part["measured"]:
                part["measured"]["cpu"] = previous.get("machine", {}).get("cpu")

        def save(measured: dict) -> None:
            info["load_average_at_end"] = os.getloadavg()[0]
            info["other_processes_cores"] = other_load.cores()
            info["suite_seconds"] = round(time.perf_counter() - start)
            result = {**kept, **measured, "machine": info,
                      "note": args.note if args.note is not None else previous.get("note")}
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1) + "\n")

        run_suite(device, plan, args.only, save)
        print(f"results: {out}")
    target = QUICK_DIR if args.quick else DOCS
    md = render(results_path("cuda", args.quick).parent, target)
    print(f"report: {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
