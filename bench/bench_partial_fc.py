"""PartialFC step time and peak memory against a dense reference, for growing class counts.

One step = margin-softmax loss of a global batch of embeddings (512-d, a leaf tensor
standing in for the backbone's output) against the class centres, backward, and the
optimizer step (SGD, momentum 0.9, weight decay 5e-4) -- what the head costs in a
training step.

  ours       losses.PartialFC + losses.optim (the training default): only the sampled rows
             are gathered, get a gradient and are updated.
  reference  the dense way (insightface's partial_fc_v2 on one process): the sampled rows
             are gathered from a full Parameter with `weight[index]`, so the gradient is a
             dense [classes x 512] matrix; F.normalize + F.linear, F.cross_entropy;
             torch.optim.SGD (its default implementation) over the whole shard.

With --fc-state-dtype bfloat16, ours keeps the momentum in bfloat16 (stochastically
rounded, losses.optim); the reference stays insightface's float32.

Both use the same sampling rule (all positives plus random negatives), the same labels and
the same matmul precision (the device's training default: bf16 on CPUs with bf16 units,
fp16 on CUDA, fp32 otherwise).

Peak memory is the peak above what was in use before the head was built: the class centres,
the optimizer state, the gradients and the step's temporaries. On a CPU every case runs in
a fresh process (the resident-set high-water mark); on CUDA torch.cuda.max_memory_allocated.

    python bench/bench_partial_fc.py [--classes 100000 1000000 2000000] [--sample-rates 1.0 0.3 0.1]
                                     [--batch-size 128] [--steps 4] [--warmup 2] [--device cpu|cuda] [--quick]
                                     [--fc-state-dtype float32|bfloat16]

With --loss, the head alone (ours) is timed once per margin loss, side by side with
`combined` (ArcFace), each with its default parameters (losses.get_margin) and
--num-subcenters sub-centres per class:

    python bench/bench_partial_fc.py --classes 1000000 --sample-rates 0.1 \
        --loss combined adaface magface curricularface elasticface_arc [--num-subcenters 3]
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script
    import _repo_path  # noqa: F401  (puts the repository root on sys.path)

from bench.common import (  # noqa: E402
    PeakMemory, available_memory_bytes, default_precision, enable_huge_pages, resolve_device, summarize, timed,
)

EMBEDDING = 512
IMPLS = ("ours", "reference")
# ours with logits_chunk_rows (losses/chunked_logits.py): the part that measures what chunking costs.
CHUNKED = "ours_chunked"


def _sample(local_targets, num_local: int, num_sample: int):
    """The reference's sampling, the same rule as PartialFC.sample (positives + random negatives)."""
    import torch

    positive = torch.unique(local_targets, sorted=True)
    if positive.numel() >= num_sample:
        index = positive
    else:
        scores = torch.rand(num_local, device=local_targets.device)
        scores[positive] = 2.0
        index = torch.topk(scores, k=num_sample, sorted=False).indices.sort().values
    return index, torch.searchsorted(index, local_targets)


def _build(impl: str, num_classes: int, sample_rate: float, low_precision, device, loss: str = "combined",
           num_subcenters: int = 1, fc_state_dtype: str = "float32", logits_chunk_rows: int = 0):
    """(step(embeddings, labels) -> loss, modules to keep alive)."""
    import torch
    import torch.nn.functional as F

    from losses import CombinedMarginLoss, PartialFC, get_margin
    from losses.optim import build_optimizer

    margin = CombinedMarginLoss(64.0, 1.0, 0.5, 0.0) if loss == "combined" else get_margin(loss)
    if impl in ("ours", CHUNKED):
        head = PartialFC(margin, EMBEDDING, num_classes, sample_rate, matmul_dtype=low_precision,
                         num_subcenters=num_subcenters, check_labels=False,
                         logits_chunk_rows=logits_chunk_rows if impl == CHUNKED else 0).to(device)
        optimizer = build_optimizer("sgd", [], head.parameters(), lr=0.1, weight_decay=5e-4, device_type=device.type,
                                    fc_state_dtype=fc_state_dtype)
        no_inf = torch.zeros((), device=device)

        def step(embeddings, labels):
            loss = head(embeddings, labels)
            loss.backward()
            optimizer.found_inf = no_inf  # as train.py's non-finite guard does on every step
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        return step, (head, optimizer)

    if loss != "combined" or num_subcenters != 1:
        raise ValueError("the dense reference implements the combined margin without sub-centres only")
    weight = torch.nn.Parameter(torch.normal(0.0, 0.01, (num_classes, EMBEDDING), device=device))
    optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9, weight_decay=5e-4)
    num_sample = max(1, int(sample_rate * num_classes))

    def step(embeddings, labels):
        if sample_rate < 1.0:
            index, targets = _sample(labels, num_classes, num_sample)
            centres = weight[index]
        else:
            centres, targets = weight, labels
        with torch.autocast(device.type, dtype=low_precision or torch.float32, enabled=low_precision is not None):
            logits = F.linear(F.normalize(embeddings), F.normalize(centres))
        logits = margin(logits.float(), targets)
        loss = F.cross_entropy(logits, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step, (weight, optimizer)


def estimate_bytes(impl: str, num_classes: int, sample_rate: float, batch: int, num_subcenters: int = 1,
                   fc_state_dtype: str = "float32") -> int:
    """The case's peak, from the sizes of what it holds (within ~10% of the measured peaks)."""
    shard = num_classes * num_subcenters * EMBEDDING * 4
    sampled = max(1, int(sample_rate * num_classes)) * num_subcenters
    logits = batch * sampled * 4
    if impl in ("ours", CHUNKED):  # (an over-estimate for the chunked head: only a guard)
        momentum = shard // 2 if fc_state_dtype == "bfloat16" else shard
        if sample_rate >= 1.0:  # weight, dense gradient, momentum; normalised centres; logits
            return int(2 * shard + momentum + sampled * EMBEDDING * 2 + 3 * logits)
        return int(shard + momentum + sampled * EMBEDDING * 10 + 3 * logits)  # + gathered, normalised, gradient rows
    # weight, momentum, dense gradient and its weight-decay copy; normalised (and gathered) rows; logits
    return int(4 * shard + (2 * shard if sample_rate >= 1.0 else sampled * EMBEDDING * 12) + 6 * logits)


def run_case(impl: str, num_classes: int, sample_rate: float, *, batch: int, steps: int, warmup: int,
             device_name: str, seed: int = 0, loss: str = "combined", num_subcenters: int = 1,
             fc_state_dtype: str = "float32", logits_chunk_rows: int = 0) -> dict:
    import torch

    device = resolve_device(device_name)
    precision = default_precision(device)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    inputs = [
        (torch.randn(batch, EMBEDDING, generator=g), torch.randint(0, num_classes, (batch,), generator=g))
        for _ in range(warmup + steps)
    ]
    inputs = [(e.to(device), l.to(device)) for e, l in inputs]
    fc_state_dtype = fc_state_dtype if impl != "reference" else "float32"
    result = {"impl": impl, "num_classes": num_classes, "sample_rate": sample_rate, "batch": batch,
              "precision": precision.name, "loss": loss, "num_subcenters": num_subcenters,
              "fc_state_dtype": fc_state_dtype}
    if impl == CHUNKED:
        result["logits_chunk_rows"] = logits_chunk_rows
    if device.type == "cpu":
        # Swapping, or the kernel's OOM killer picking another process, would be worse than a gap.
        needed = estimate_bytes(impl, num_classes, sample_rate, batch, num_subcenters, fc_state_dtype)
        free = available_memory_bytes(device)
        if free is not None and needed > 0.9 * free:
            result["skipped"] = f"needs ~{needed / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
            return result

    keep = None
    try:
        with PeakMemory(device) as memory:
            step, keep = _build(impl, num_classes, sample_rate, precision.autocast_dtype, device, loss, num_subcenters,
                                fc_state_dtype, logits_chunk_rows)
            times, losses = [], []
            for i, (emb, labels) in enumerate(inputs):
                emb = emb.clone().requires_grad_()
                seconds = timed(lambda: losses.append(step(emb, labels).detach()), device)
                if i >= warmup:
                    times.append(seconds)
            peak = memory.peak_bytes()
    except torch.OutOfMemoryError:
        step = keep = None
        result["skipped"] = "out of device memory"
        return result
    result.update(summarize(times))
    result["peak_bytes"] = peak
    result["losses"] = [float(x) for x in losses]
    del keep
    return result


def _case_in_subprocess(impl, num_classes, sample_rate, args, loss="combined", num_subcenters=1) -> dict:
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--case", impl, str(num_classes), str(sample_rate),
        "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--device", args.device, "--loss", loss, "--num-subcenters", str(num_subcenters),
        "--fc-state-dtype", args.fc_state_dtype, "--logits-chunk-rows", str(getattr(args, "logits_chunk_rows", 0)),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        reason = "out of memory (killed)" if proc.returncode in (-9, 137) else tail[0][:200]
        return {"impl": impl, "num_classes": num_classes, "sample_rate": sample_rate, "batch": args.batch_size,
                "skipped": f"failed: {reason}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(classes, sample_rates, *, batch_sizes=(128,), steps=4, warmup=2, rounds=1, device="cpu", log=print,
        fc_state_dtype="float32", impls=IMPLS, logits_chunk_rows=0) -> dict:
    """All cases; on a CPU each in its own process (honest peaks), on CUDA in this one.

    With rounds > 1, ours and the reference alternate that many times per case and their
    step times are pooled, so that a burst of other load cannot land on one of them only.
    """
    import torch

    dev = resolve_device(device)
    args = argparse.Namespace(steps=steps, warmup=warmup, device=str(dev), fc_state_dtype=fc_state_dtype,
                              logits_chunk_rows=logits_chunk_rows)
    cases = []
    for batch in batch_sizes:
        for c in classes:
            for sr in sample_rates:
                runs = {impl: [] for impl in impls}
                for _ in range(rounds):
                    for impl in impls:
                        start = time.perf_counter()
                        if dev.type == "cuda":
                            r = run_case(impl, c, sr, batch=batch, steps=steps, warmup=warmup, device_name=str(dev),
                                         fc_state_dtype=fc_state_dtype, logits_chunk_rows=logits_chunk_rows)
                            torch.cuda.empty_cache()
                        else:
                            args.batch_size = batch
                            r = _case_in_subprocess(impl, c, sr, args)
                        runs[impl].append(r)
                        log(_case_line(r, time.perf_counter() - start))
                cases += [_pool(results) for results in runs.values()]
    return {"cases": cases, "classes": list(classes), "sample_rates": list(sample_rates), "rounds": rounds,
            "batch_sizes": list(batch_sizes), "embedding_size": EMBEDDING, "steps": steps, "warmup": warmup,
            "fc_state_dtype": fc_state_dtype, "impls": list(impls), "logits_chunk_rows": logits_chunk_rows}


def run_losses(losses, classes, sample_rates, *, batch=128, steps=4, warmup=2, num_subcenters=1, device="cpu",
               rounds=1, fc_state_dtype="float32", log=print) -> dict:
    """The head (ours) once per margin loss, per (classes, rate): step time and peak memory.

    With rounds > 1 the losses take turns that many times (every loss once, then again), so
    that other load on the machine slows them alike; each loss's times are pooled."""
    import torch

    dev = resolve_device(device)
    args = argparse.Namespace(steps=steps, warmup=warmup, device=str(dev), batch_size=batch, fc_state_dtype=fc_state_dtype)
    cases = []
    for c in classes:
        for sr in sample_rates:
            measured: dict[str, list[dict]] = {loss: [] for loss in losses}
            for _ in range(max(1, rounds)):
                for loss in losses:
                    start = time.perf_counter()
                    if dev.type == "cuda":
                        r = run_case("ours", c, sr, batch=batch, steps=steps, warmup=warmup, device_name=str(dev),
                                     loss=loss, num_subcenters=num_subcenters, fc_state_dtype=fc_state_dtype)
                        torch.cuda.empty_cache()
                    else:
                        r = _case_in_subprocess("ours", c, sr, args, loss, num_subcenters)
                    r.setdefault("loss", loss)
                    log(f"{loss:<16} " + _case_line(r, time.perf_counter() - start).strip())
                    measured[loss].append(r)
            cases.extend(_pool(measured[loss]) for loss in losses)
    return {"cases": cases, "losses": list(losses), "classes": list(classes), "sample_rates": list(sample_rates),
            "batch": batch, "num_subcenters": num_subcenters, "embedding_size": EMBEDDING, "steps": steps,
            "warmup": warmup, "rounds": rounds, "fc_state_dtype": fc_state_dtype}


def format_loss_table(result: dict) -> str:
    """One row per (classes, rate, loss), with the step time relative to `combined`."""
    lines = [
        "| classes | sample rate | loss | sub-centres | ms/step | vs combined | peak GiB |",
        "| ---: | ---: | :--- | ---: | ---: | ---: | ---: |",
    ]
    by_key = {(r["num_classes"], r["sample_rate"], r["loss"]): r for r in result["cases"]}
    for c in result["classes"]:
        for sr in result["sample_rates"]:
            base = by_key.get((c, sr, "combined"))
            for loss in result["losses"]:
                r = by_key[(c, sr, loss)]
                if "skipped" in r:
                    lines.append(f"| {c:,} | {sr} | {loss} | {result['num_subcenters']} | skipped: {r['skipped']} | - | - |")
                    continue
                ratio = f"{r['min_s'] / base['min_s']:.2f}x" if base and "skipped" not in base else "-"
                peak = f"{r['peak_bytes'] / 2**30:.2f}" if r.get("peak_bytes") else "-"
                lines.append(f"| {c:,} | {sr} | {loss} | {result['num_subcenters']} | {1000 * r['min_s']:.1f} | "
                             f"{ratio} | {peak} |")
    return "\n".join(lines)


def _pool(results: list[dict]) -> dict:
    """One case measured in several rounds: all step times together, the largest peak."""
    ok = [r for r in results if "skipped" not in r]
    if not ok:
        return results[0]
    pooled = dict(ok[0])
    if len(ok) > 1:
        pooled.update(summarize([t for r in ok for t in r["times_s"]]))
        peaks = [r["peak_bytes"] for r in ok if r.get("peak_bytes") is not None]
        pooled["peak_bytes"] = max(peaks) if peaks else None
        pooled["rounds"] = len(ok)
    return pooled


def _case_line(r: dict, wall: float) -> str:
    head = f"  {r['impl']:<9} classes {r['num_classes']:>8} rate {r['sample_rate']:<4} batch {r['batch']:<5}"
    if "skipped" in r:
        return f"{head} skipped: {r['skipped']}"
    peak = r.get("peak_bytes")
    mem = f"{peak / 2**30:6.2f} GiB" if peak is not None else "   n/a"
    return f"{head} {1000 * r['min_s']:9.1f} ms/step  peak {mem}  ({wall:.0f} s)"


def paired(result: dict) -> list[dict]:
    """One row per (batch, classes, rate): ours, the reference and the ratios."""
    by_key = {(r["batch"], r["num_classes"], r["sample_rate"], r["impl"]): r for r in result["cases"]}
    rows = []
    for batch in result["batch_sizes"]:
        for c in result["classes"]:
            for sr in result["sample_rates"]:
                ours, ref = by_key.get((batch, c, sr, "ours")), by_key.get((batch, c, sr, "reference"))
                row = {"batch": batch, "num_classes": c, "sample_rate": sr, "ours": ours, "reference": ref}
                if ours and ref and "skipped" not in ours and "skipped" not in ref:
                    row["time_ratio"] = ours["min_s"] / ref["min_s"]
                    if ours.get("peak_bytes") and ref.get("peak_bytes"):
                        row["memory_ratio"] = ours["peak_bytes"] / ref["peak_bytes"]
                rows.append(row)
    return rows


def format_table(result: dict) -> str:
    def ms(r):
        return "skipped" if r is None or "skipped" in r else f"{1000 * r['min_s']:.0f}"

    def gib(r):
        if r is None or "skipped" in r or r.get("peak_bytes") is None:
            return "-"
        return f"{r['peak_bytes'] / 2**30:.2f}"

    def ratio(v):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}x"

    lines = [
        "| batch | classes | sample rate | ours ms/step | reference ms/step | time ours/ref | ours peak GiB | "
        "reference peak GiB | memory ours/ref |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    notes = []
    for row in paired(result):
        o, r = row["ours"], row["reference"]
        lines.append(
            f"| {row['batch']} | {row['num_classes']:,} | {row['sample_rate']} | {ms(o)} | {ms(r)} | "
            f"{ratio(row.get('time_ratio'))} | {gib(o)} | {gib(r)} | {ratio(row.get('memory_ratio'))} |"
        )
        for label, case in (("ours", o), ("reference", r)):
            if case and "skipped" in case:
                notes.append(f"{label}, {row['num_classes']:,} classes, rate {row['sample_rate']}: {case['skipped']}")
    if notes:
        lines += ["", "Skipped: " + "; ".join(notes) + "."]
    return "\n".join(lines)


def format_chunked_table(result: dict) -> str:
    """Ours with and without logits_chunk_rows (and the reference), per (batch, classes, rate)."""
    by_key = {(r["batch"], r["num_classes"], r["sample_rate"], r["impl"]): r for r in result["cases"]}

    def cells(r):
        if r is None or "skipped" in r:
            return ["skipped" if r else "-", "-"]
        return [f"{1000 * r['min_s']:.0f}", f"{r['peak_bytes'] / 2**30:.2f}" if r.get("peak_bytes") else "-"]

    def ratio(a, b, key):
        ok = all(x is not None and "skipped" not in x and x.get(key) for x in (a, b))
        return f"{a[key] / b[key]:.2f}x" if ok else "-"

    chunk = result.get("logits_chunk_rows")
    lines = [
        f"| batch | classes | sample rate | ours ms/step | chunked ({chunk} rows) ms/step | time chunked/ours | "
        "ours peak GiB | chunked peak GiB | memory chunked/ours | reference ms/step | reference peak GiB |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for batch in result["batch_sizes"]:
        for c in result["classes"]:
            for sr in result["sample_rates"]:
                o, ch, ref = (by_key.get((batch, c, sr, impl)) for impl in ("ours", CHUNKED, "reference"))
                (om, og), (cm, cg), (rm, rg) = cells(o), cells(ch), cells(ref)
                lines.append(f"| {batch} | {c:,} | {sr} | {om} | {cm} | {ratio(ch, o, 'min_s')} | {og} | {cg} | "
                             f"{ratio(ch, o, 'peak_bytes')} | {rm} | {rg} |")
    return "\n".join(lines)


def plot(result: dict, path_png: str, title_suffix: str = "") -> None:
    """Samples/s and peak memory against the class count, one line per (impl, rate); two panels in one PNG."""
    from eval.plot import line_plots

    batch = max(result["batch_sizes"])
    speed, memory = {}, {}
    for row in paired(result):
        if row["batch"] != batch:
            continue
        for impl in IMPLS:
            case = row[impl]
            label = f"{impl} rate {row['sample_rate']}"
            xs_s, ys_s = speed.setdefault(label, ([], []))
            xs_m, ys_m = memory.setdefault(label, ([], []))
            ok = case is not None and "skipped" not in case
            xs_s.append(row["num_classes"])
            ys_s.append(batch / case["min_s"] if ok else float("nan"))
            xs_m.append(row["num_classes"])
            ys_m.append(case["peak_bytes"] / 2**30 if ok and case.get("peak_bytes") else float("nan"))
    xlim = (min(result["classes"]), max(result["classes"]))
    axes = dict(xlabel="classes", logx=True, logy=True, xlim=xlim)
    line_plots(path_png, [
        dict(series=speed, title=f"PartialFC step, batch {batch}{title_suffix}", ylabel="samples/s", **axes),
        dict(series=memory, title=f"PartialFC peak memory, batch {batch}{title_suffix}", ylabel="GiB", **axes),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[100_000, 1_000_000, 2_000_000])
    parser.add_argument("--sample-rates", type=float, nargs="+", default=[1.0, 0.3, 0.1])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[128])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternate ours and the reference (with --loss: the losses) this many times")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="small class counts, few steps (smoke test)")
    parser.add_argument("--loss", nargs="+", help="time the head per margin loss (ours only), e.g. combined adaface")
    parser.add_argument("--num-subcenters", type=int, default=1, help="with --loss: sub-centres per class")
    parser.add_argument("--fc-state-dtype", choices=["float32", "bfloat16"], default="float32",
                        help="dtype of ours' momentum (the reference keeps float32)")
    parser.add_argument("--logits-chunk-rows", type=int, default=0,
                        help="also time ours with this logits_chunk_rows (impl ours_chunked)")
    parser.add_argument("--case", nargs=3, metavar=("IMPL", "CLASSES", "RATE"), help=argparse.SUPPRESS)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    enable_huge_pages()  # as train.py does
    if args.case:  # one case, in this (fresh) process; the result is the last line of stdout
        impl, c, sr = args.case[0], int(args.case[1]), float(args.case[2])
        r = run_case(impl, c, sr, batch=args.batch_size[0], steps=args.steps, warmup=args.warmup,
                     device_name=args.device, loss=(args.loss or ["combined"])[0], num_subcenters=args.num_subcenters,
                     fc_state_dtype=args.fc_state_dtype, logits_chunk_rows=args.logits_chunk_rows)
        print(json.dumps(r))
        return
    if args.quick:
        args.classes, args.steps, args.warmup = [10_000, 50_000], 2, 1
    if args.loss:
        from losses import available_losses

        unknown = [name for name in args.loss if name not in available_losses()]
        if unknown:
            parser.error(f"unknown loss {unknown[0]!r}; valid: {', '.join(available_losses())}")
        losses = list(dict.fromkeys(["combined", *args.loss]))  # combined first: the baseline
        result = run_losses(losses, args.classes, args.sample_rates, batch=args.batch_size[0], steps=args.steps,
                            warmup=args.warmup, num_subcenters=args.num_subcenters, device=args.device,
                            rounds=args.rounds, fc_state_dtype=args.fc_state_dtype)
        print(format_loss_table(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        return
    impls = (*IMPLS, CHUNKED) if args.logits_chunk_rows > 0 else IMPLS
    result = run(args.classes, args.sample_rates, batch_sizes=args.batch_size, steps=args.steps,
                 warmup=args.warmup, rounds=args.rounds, device=args.device, fc_state_dtype=args.fc_state_dtype,
                 impls=impls, logits_chunk_rows=args.logits_chunk_rows)
    print(format_table(result))
    if CHUNKED in impls:
        print(format_chunked_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
