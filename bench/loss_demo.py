"""The synthetic-faces demo trained with every margin loss: held-out accuracy before and after.

Each case is `python train.py configs/demo.py --loss=NAME ...` (the command is printed, so
every figure can be reproduced by hand): the demo's plan as configs/demo.py has it (its network,
steps and s, `margin_scale`), each loss's paper defaults for the rest. The accuracy is the demo's
own final log line (open-set verification on held-out identities, flip-summed embeddings).

    python bench/loss_demo.py                      # every case, two at a time (one thread each)
    python bench/loss_demo.py --cases adaface magface --jobs 1
    python bench/loss_demo.py --steps 75           # every case at half the demo's budget
    python bench/loss_demo.py --quick              # smoke test: 2 steps per case

Results: docs/bench_results/extra/loss_demo.json (kept in the repository, with the machine) and a
markdown table on stdout; docs/benchmarks.md renders it, README.md quotes it.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    import _repo_path  # noqa: F401  (puts the repository root on sys.path)

import torch  # noqa: E402

from bench.common import ROOT, machine_info  # noqa: E402

DEMO = "configs/demo.py"
RESULTS = ROOT / "docs" / "bench_results" / "extra" / "loss_demo.json"
FINAL_LINE = re.compile(
    r"verification accuracy before training ([0-9.]+)%, after (\d+) steps ([0-9.]+)% \(best ([0-9.]+)%\)"
)

# name -> extra train.py arguments. `combined` is the demo as shipped (CosFace, margin_list).
CASES: dict[str, list[str]] = {
    "combined": [],
    "arcface": ["--loss=arcface"],
    "cosface": ["--loss=cosface"],
    "adaface": ["--loss=adaface"],
    "magface": ["--loss=magface"],
    "curricularface": ["--loss=curricularface"],
    "elasticface_arc": ["--loss=elasticface_arc"],
    "elasticface_cos": ["--loss=elasticface_cos"],
    "subcenter_arcface": ["--loss=arcface", "--num_subcenters=3"],
    "combined_fc_state_bf16": ["--fc_state_dtype=bfloat16"],
}


def run_case(name: str, out_root: Path, threads: int, steps: int | None) -> dict:
    command = [
        sys.executable, "train.py", DEMO, *CASES[name], f"--output={out_root / name}",
        "--verbose=1000000",  # before and after only: the mid-run evaluation adds nothing here
    ]
    if steps is not None:
        command.append(f"--max_steps={steps}")  # the lr schedule follows the shorter run
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    print("$ " + " ".join(command[1:]), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    found = FINAL_LINE.findall(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not found:
        tail = (proc.stderr or proc.stdout)[-2000:]
        raise SystemExit(f"error: case {name} failed (exit {proc.returncode}):\n{tail}")
    before, steps, after, best = found[-1]
    return dict(name=name, args=CASES[name], before=float(before), steps=int(steps), after=float(after),
                best=float(best), seconds=round(seconds, 1), threads=threads)


def markdown(results: list[dict]) -> str:
    lines = ["| loss | train.py arguments | before | after (steps) |", "| --- | --- | ---: | ---: |"]
    for r in results:
        args = f"`{' '.join(r['args'])}`" if r["args"] else "the demo as shipped (CosFace via `margin_list`)"
        lines.append(f"| {r['name']} | {args} | {r['before']:.2f}% | {r['after']:.2f}% ({r['steps']}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--jobs", type=int, default=2, help="cases run at once (each gets cpus/jobs threads)")
    parser.add_argument("--out", default="work_dirs/loss_demo")
    parser.add_argument("--steps", type=int, default=None, help="fewer steps than the demo's 300 (all cases alike)")
    parser.add_argument("--quick", action="store_true", help="2 steps per case; results are not saved")
    args = parser.parse_args()

    # Draw the data set once before the parallel runs, so that they do not race to write it.
    first, rest = args.cases[:1], args.cases[1:]
    threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    out_root = ROOT / args.out
    steps = 2 if args.quick else args.steps
    results = [run_case(first[0], out_root, threads, steps)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results += list(pool.map(lambda name: run_case(name, out_root, threads, steps), rest))
    for r in results:
        print(f"{r['name']}: {r['before']:.2f}% -> {r['after']:.2f}% ({r['seconds']:.0f} s)", flush=True)
    print(markdown(results))
    if not args.quick:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        old = json.loads(RESULTS.read_text())["results"] if RESULTS.exists() else []
        merged = {r["name"]: r for r in old} | {r["name"]: r for r in results}
        RESULTS.write_text(json.dumps(dict(
            date=datetime.date.today().isoformat(), machine=machine_info(torch.device("cpu")),
            results=[merged[n] for n in CASES if n in merged]), indent=1) + "\n")
        print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
