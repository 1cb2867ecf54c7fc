"""Render docs/benchmarks.md (and one PartialFC plot per device) from the saved results.

The goals of the performance issues are checked here: the CPU goals on the CPU results
(CUDA results show the same ratios for information), the GPU goals (ours against
insightface's GPU path, MFU) on the CUDA results. Result files from before a figure
existed render it as "—".
"""
from __future__ import annotations

import json
from pathlib import Path

if __package__ in (None, ""):  # run as a script
    import _repo_path  # noqa: F401  (puts the repository root on sys.path)

from bench import bench_data, bench_inference, bench_partial_fc, bench_train  # noqa: E402
from bench.common import ROOT  # noqa: E402

GOAL_TRAIN_SPEEDUP = 3.0
GOAL_TRAIN_LOSS_DIFF = 0.02  # "loss curves matching": every step within 2% of the fp32 reference
GOAL_PFC_TIME, GOAL_PFC_MEMORY = 0.5, 0.5
GOAL_PFC_BF16_STATE_TIME, GOAL_PFC_BF16_STATE_MEMORY = 0.5, 0.40  # fc_state_dtype="bfloat16" (issue 15)
GOAL_DATA = 0.85
GOAL_GPU_VS_INSIGHTFACE = 1.3  # r50: ours against insightface's own fp16 GPU step, samples/s
GOAL_GPU_MFU = 0.25  # r50: model-FLOPs utilisation of our step on the GPU

DEVICE_TITLES = {
    "cpu": "CPU",  # a results file from before the CPUs' kinds had files of their own
    "cpu_amx_bf16": "CPU with AMX (bf16 matrix tiles): the default path is bf16 autocast",
    "cpu_avx512_bf16": "CPU with AVX512-BF16, no AMX: the default path is bf16 autocast",
    "cpu_avx512": "CPU with AVX512, no bf16 units: the default path is fp32",
    "cpu_avx2": "CPU with AVX2 only: the default path is fp32",
    "cuda": "CUDA GPU",
}
# Sections in this order; any other results file after them.
DEVICE_ORDER = ("cpu_amx_bf16", "cpu_avx512_bf16", "cpu_avx512", "cpu_avx2", "cpu", "cuda")


def is_cpu_kind(kind: str) -> bool:
    return kind == "cpu" or kind.startswith("cpu_")


def device_title(kind: str, info: dict) -> str:
    title = DEVICE_TITLES.get(kind, kind)
    limits = info.get("isa_limits")
    if limits:  # the kernels of a larger CPU held to a smaller instruction set (make bench-avx2)
        caps = ", ".join(f"{k}={v}" for k, v in sorted(limits.items()))
        title += f" (emulated: {caps} on {info.get('cpu', 'a larger CPU')} with {info.get('cpu_matrix_units')})"
    return title


def _gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB"


def _machine_lines(info: dict, note: str | None, parts: dict) -> list[str]:
    dates = _measurement_dates(parts)
    # Each section carries the time it started; only sections from before this run's start
    # were kept from an earlier run (run_all.py --only).
    if any(d < (info.get("date") or "") for d in dates):
        lines = [f"- Dates: {min(dates)} to {max(dates)}; the latest run ({info.get('date')}, "
                 f"{info.get('suite_seconds', '?')} s) re-measured some sections only, and each section says when "
                 "it was measured; the lines below describe that run"]
    else:
        lines = [f"- Date: {info.get('date')}; suite run time {info.get('suite_seconds', '?')} s"]
        if dates - {info.get("date")}:
            lines[0] += f" (the last section started at {max(dates)})"
    cpu = f"- CPU: {info.get('cpu')}, {info.get('cpu_cores')} cores, torch threads {info.get('torch_threads')}"
    if info.get("cpu_matrix_units"):
        cpu += f"; vector/matrix units: {info['cpu_matrix_units']} (torch kernels: {info.get('torch_cpu_capability')})"
    lines.append(cpu)
    if info.get("gpu"):
        lines.append(f"- GPU: {info['gpu_count']} x {info['gpu']} ({info['gpu_memory_gib']} GiB), CUDA {info.get('cuda')}")
    lines.append(
        f"- Python {info.get('python')}, torch {info.get('torch')}, onnxruntime {info.get('onnxruntime')}; {info.get('platform')}"
    )
    if info.get("huge_pages"):
        lines.append(f"- Host allocator: {info['huge_pages']} (as train.py sets it; all paths share it)")
    other = info.get("other_processes_cores")
    if other is not None:
        cores = info.get("cpu_cores") or 1
        lines.append(
            f"- Other processes kept {other:.2f} of the {cores} cores busy on average during the run"
            + (" -- **the cores were shared**: absolute numbers are low and noisy; the paths of each "
               "benchmark were interleaved so the ratios are the meaningful result" if _shared(info) else
               " (a quiet machine)")
        )
    elif info.get("load_average_at_start") is not None:  # results from before the other-process measure
        start, end = info["load_average_at_start"], info.get("load_average_at_end")
        lines.append(f"- Load average at start / end: {start:.1f} / {end if end is None else f'{end:.1f}'}")
    if note:
        lines.append(f"- Note: {note}")
    return lines


def _pfc_row(result: dict, classes: int, rate: float, batch: int | None = None) -> dict | None:
    rows = [r for r in bench_partial_fc.paired(result) if r["num_classes"] == classes and r["sample_rate"] == rate]
    if batch is not None:
        rows = [r for r in rows if r["batch"] == batch]
    return rows[0] if rows else None


def _shared(info: dict) -> bool:
    """Did other processes take a noticeable share of the cores while the suite ran?"""
    other = info.get("other_processes_cores")
    if other is not None:
        return other > 0.1 * (info.get("cpu_cores") or 1)
    return (info.get("load_average_at_start") or 0) > 0.5 * (info.get("cpu_cores") or 1)


def _conv_bound_remark(paths: dict, best: str) -> str:
    """Why the step cannot go faster, from the profiled step of each path (bench_train)."""
    ref, fast = paths["reference"].get("profiled_step"), paths[best].get("profiled_step")
    if not ref or not fast:
        return ("The gap is the backbone's own speed in bf16 on this CPU: convolutions dominate the step and "
                "run at the bf16 rate oneDNN reaches on these cores.")
    ref_total = ref["conv_s"] + ref["other_s"]
    precision = paths[best].get("precision", "bf16")
    return (f"The ceiling is the convolutions: in a profiled step they take {100 * ref['conv_s'] / ref_total:.0f}% of "
            f"the fp32 reference's time and run {ref['conv_s'] / fast['conv_s']:.2f}x as fast in {precision} "
            f"({ref['conv_s']:.2f} s vs {fast['conv_s']:.2f} s), so even with every other op free the step "
            f"could reach at most {ref_total / fast['conv_s']:.2f}x; the other ops take {fast['other_s']:.2f} s "
            f"({best}) against {ref['other_s']:.2f} s.")


def _gpu_goals(train_models: list[dict]) -> list[tuple[str, str, str, bool | None, str]]:
    """(goal, target, measured, met or None when unmeasured, remark) of the GPU goals, per r50 batch size."""
    out = []
    for m in train_models:
        if m["model"] != "r50":
            continue
        paths, batch = m["paths"], m["batch_per_process"]
        ours = [p for p in ("default", "compiled") if p in paths]
        if not ours:
            continue
        if "insightface" in paths:
            best = max(ours, key=lambda p: paths[p]["speedup_vs_insightface"])
            ratio = paths[best]["speedup_vs_insightface"]
            measured = ", ".join(f"{p} {paths[p]['speedup_vs_insightface']:.2f}x" for p in ours)
            out.append((f"r50 batch {batch}: training step vs insightface's GPU path (fp16, GradScaler, "
                        "cudnn.benchmark)", f">= {GOAL_GPU_VS_INSIGHTFACE}x samples/s",
                        f"{measured} ({paths[best]['samples_per_s']:.0f} vs "
                        f"{paths['insightface']['samples_per_s']:.0f} samples/s)",
                        ratio >= GOAL_GPU_VS_INSIGHTFACE, f"best: {best}"))
        else:
            out.append((f"r50 batch {batch}: training step vs insightface's GPU path",
                        f">= {GOAL_GPU_VS_INSIGHTFACE}x samples/s", "—", None,
                        "not measured in this result file (it predates the insightface path)"))
        with_mfu = [p for p in ours if paths[p].get("mfu") is not None]
        if with_mfu:
            best = max(with_mfu, key=lambda p: paths[p]["mfu"])
            out.append((f"r50 batch {batch}: MFU of our step", f">= {100 * GOAL_GPU_MFU:.0f}%",
                        ", ".join(f"{p} {100 * paths[p]['mfu']:.1f}%" for p in with_mfu),
                        paths[best]["mfu"] >= GOAL_GPU_MFU, f"of {paths[best]['mfu_peak']}"))
        else:
            out.append((f"r50 batch {batch}: MFU of our step", f">= {100 * GOAL_GPU_MFU:.0f}%", "—", None,
                        "no MFU in this result file"))
    return out


def goals(results: dict, info: dict, kind: str = "cpu_amx_bf16") -> list[tuple[str, str, str, str, str]]:
    """(goal, target, measured, status, remark) for each goal of the issues. The CPU goals
    are judged on the CPU (elsewhere their status is "info"), the GPU goals on CUDA."""
    out = []
    load_remark = " The cores were shared with other jobs during the run." if _shared(info) else ""
    train_models = results.get("train", {}).get("models", [])
    if kind == "cuda":
        out += [(goal, want, got, "—" if ok is None else _status(ok), remark)
                for goal, want, got, ok, remark in _gpu_goals(train_models)]
    gpu_rows = len(out)

    r50 = next((m for m in train_models if m["model"] == "r50"), None)  # the CPU goal: the first r50 batch
    if r50 is not None:
        paths = r50["paths"]
        best = max((p for p in ("default", "compiled") if p in paths), key=lambda p: paths[p]["speedup"])
        e = paths[best]
        speed_ok = e["speedup"] >= GOAL_TRAIN_SPEEDUP
        loss_ok = all(paths[p]["max_rel_loss_diff"] <= GOAL_TRAIN_LOSS_DIFF for p in ("default", "compiled")
                      if p in paths)
        measured = ", ".join(
            f"{p} {paths[p]['speedup']:.2f}x (loss within {100 * paths[p]['max_rel_loss_diff']:.2f}%)"
            for p in ("default", "compiled") if p in paths
        )
        remark = f"best: {best}" + (" (compile=True)" if best == "compiled" else "")
        if not speed_ok and not info.get("gpu"):
            remark += ". " + _conv_bound_remark(paths, best) + load_remark
        out.append(("r50 training step vs eager fp32", f">= {GOAL_TRAIN_SPEEDUP:.0f}x, loss curves within "
                    f"{100 * GOAL_TRAIN_LOSS_DIFF:.0f}%", measured, _status(speed_ok and loss_ok), remark))

    pfc = results.get("partial_fc")
    if pfc:
        batch = min(pfc["batch_sizes"])
        row = _pfc_row(pfc, 1_000_000, 0.1, batch)
        out += _pfc_time_goal("PartialFC 1M classes, rate 0.1: step time", row, GOAL_PFC_TIME, load_remark)
        if row and "memory_ratio" in row:
            ok = row["memory_ratio"] <= GOAL_PFC_MEMORY
            shard = 1_000_000 * bench_partial_fc.EMBEDDING * 4
            ours, ref = row["ours"]["peak_bytes"], row["reference"]["peak_bytes"]
            remark = ""
            if not ok:
                remark = (
                    f"Structural floor: both keep the whole shard of class centres and its momentum buffer "
                    f"(2 x {_gib(shard)}); the reference adds the dense gradient and SGD's weight-decay copy of it. "
                    f"Weights + momentum alone are {2 * shard / ref:.2f}x the reference's peak; the rest of ours "
                    f"({_gib(ours - 2 * shard)}) is the sampled rows' working set and the process's own allocations."
                )
            out.append(("PartialFC 1M classes, rate 0.1: peak memory", f"<= {GOAL_PFC_MEMORY}x dense",
                        f"{row['memory_ratio']:.2f}x ({_gib(ours)} vs {_gib(ref)})", _status(ok), remark))
        row = _pfc_row(pfc, 1_000_000, 1.0, batch)
        out += _pfc_time_goal("PartialFC 1M classes, rate 1.0: step time", row, 1.0, load_remark)

    pfc16 = results.get("partial_fc_bf16_state")
    row = _pfc_row(pfc16, 1_000_000, 0.1, min(pfc16["batch_sizes"])) if pfc16 else None
    out += _pfc_time_goal("PartialFC 1M classes, rate 0.1, bfloat16 state: step time", row,
                          GOAL_PFC_BF16_STATE_TIME, load_remark)
    if row and "memory_ratio" in row:
        ok = row["memory_ratio"] <= GOAL_PFC_BF16_STATE_MEMORY
        ours, ref = row["ours"]["peak_bytes"], row["reference"]["peak_bytes"]
        out.append(("PartialFC 1M classes, rate 0.1, bfloat16 state: peak memory",
                    f"<= {GOAL_PFC_BF16_STATE_MEMORY:.2f}x dense",
                    f"{row['memory_ratio']:.3f}x ({_gib(ours)} vs {_gib(ref)})", _status(ok), ""))

    data = results.get("data")
    if data:
        ratio = data.get("worker_vs_raw", data["getitem_vs_raw"])
        ok = ratio >= GOAL_DATA
        out.append(("Data path: a loader worker's images/s vs raw read + decode", f">= {100 * GOAL_DATA:.0f}%",
                    f"{100 * ratio:.1f}% (single float32 items: {100 * data['getitem_vs_raw']:.1f}%)",
                    _status(ok), ""))
    if not is_cpu_kind(kind):  # the CPU goals' ratios, for information
        out = out[:gpu_rows] + [(g, w, m, "info", r) for g, w, m, _s, r in out[gpu_rows:]]
    return out


def _pfc_time_goal(goal: str, row: dict | None, target: float, load_remark: str) -> list[tuple]:
    """The goal row for a PartialFC step-time ratio, or none where the result has no such pair."""
    if not row or "time_ratio" not in row:
        return []
    ok = row["time_ratio"] <= target
    return [(goal, f"<= {target}x dense", f"{row['time_ratio']:.2f}x", _status(ok), "" if ok else load_remark.strip())]


def _status(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def _measurement_dates(result: dict) -> set[str]:
    return {p["measured"]["date"] for p in result.values() if isinstance(p, dict) and p.get("measured")}


def _measured(part: dict, info: dict, result: dict) -> list[str]:
    """When a section was measured, where the sections come from more than one run."""
    m = part.get("measured")
    if not m or len(_measurement_dates(result) | {info.get("date")}) < 2:
        return []
    other = m.get("other_processes_cores")
    load = f"; other processes used {other:.2f} of the {info.get('cpu_cores')} cores" if other is not None else ""
    # A section re-measured on another machine of the same kind names it (earlier files: the EPYC).
    cpu = m.get("cpu") or (info.get("cpu") if m["date"] == info.get("date") else "the machine of the earlier run")
    where = f" on {cpu}" if cpu != info.get("cpu") else ""
    return [f"*Measured at {m['date']}{where} ({m['seconds']} s{load}).*", ""]


def _conv_breakdown(train: dict) -> list[str]:
    """Where a profiled step's time goes: convolutions (forward + backward) and everything else."""
    rows = []
    for m in train["models"]:
        for kind, e in m["paths"].items():
            if e.get("profiled_step"):
                p = e["profiled_step"]
                rows.append(f"| {m['model']} | {kind} | {p['conv_s']:.2f} | {p['other_s']:.2f} | "
                            f"{100 * p['conv_s'] / (p['conv_s'] + p['other_s']):.0f}% |")
    if not rows:
        return []
    return ["One more step of each path under the CPU profiler, by the ops' own time: what bounds the speed-up "
            "is how much faster the convolutions run.", "",
            "| model | path | convolutions s | other ops s | convolution share |",
            "| --- | --- | ---: | ---: | ---: |", *rows, ""]


def _loss_curves(train: dict) -> list[str]:
    lines = ["Loss at every step (warm-up included), same batches and initial weights:", ""]
    several_batches = len({m["batch_per_process"] for m in train["models"]}) > 1
    for m in train["models"]:
        name = f"{m['model']} batch {m['batch_per_process']}" if several_batches else m["model"]
        for p, e in m["paths"].items():
            lines.append(f"- {name} {p}: " + ", ".join(f"{x:.3f}" for x in e["losses"]))
    return lines


# What the compiled path's warm-up time is, by the state of torch.compile's caches it ran with
# (bench_train._cold_compile_cache); files from before the field say nothing.
_COMPILE_CACHE = {"empty": " (inductor's caches empty, as on a first compile=True run)",
                  "as found": " (inductor's caches as found: a rerun's time, shorter than a first run's)"}


def render_device(kind: str, result: dict, target: Path) -> list[str]:
    info = result.get("machine", {})
    failed = {k: v["error"] for k, v in result.items() if isinstance(v, dict) and "error" in v}
    result = {k: v for k, v in result.items() if k not in failed}
    lines = [f"## {device_title(kind, info)}", ""]
    lines += _machine_lines(info, result.get("note"), result) + [""]
    for part, error in failed.items():
        lines += [f"**{part}: the benchmark failed** ({error}).", ""]

    rows = goals(result, info, kind)
    if rows:
        lines += [("### Goals" if kind == "cuda" or is_cpu_kind(kind) else "### The goals' ratios (the goals are set for the CPU)"),
                  ""]
        if kind == "cuda":
            lines += ["The GPU goals are judged here; the CPU goals' ratios are shown for information.", ""]
        lines += ["| goal | target | measured | status | remark |", "| --- | --- | --- | --- | --- |"]
        for goal, want, got, status, remark in rows:
            lines.append(f"| {goal} | {want} | {got} | {status} | {remark} |")
        lines.append("")

    if "train" in result:
        t = result["train"]
        lines += [
            "### (a) Training step",
            "",
            *_measured(t, info, result),
            f"Forward, PartialFC loss ({t['num_classes']:,} classes, sample rate 1.0), backward, clipping and "
            f"SGD step; the fastest of {t['steps']} timed steps after {t['warmup']} warm-up steps. *reference*: eager "
            "fp32, NCHW, torch's own nn.Conv2d and nn.PReLU, torch.optim.SGD, loss read every step (insightface on "
            "a CPU, where its fp16 flag does nothing); *insightface* (CUDA only): insightface's own GPU path -- the "
            "backbone built with fp16=True (trunk under float16 autocast), NCHW, torch's modules, "
            "cudnn.benchmark=True, the dense PartialFC_V2 head (a full Parameter, normalise + linear under float16 "
            "autocast), torch.optim.SGD, GradScaler(growth_interval=100), loss read every step "
            "(bench/insightface_reference.py); *default*: train.py's defaults (channels_last, autocast, the CPU "
            "routes of backbones/conv.py and backbones/activation.py, fused SGD, no host sync, cudnn.benchmark on "
            "CUDA); *compiled*: default + compile=True. "
            "Loss difference: the largest relative difference from the reference's loss over all steps. "
            "*MFU* (model-FLOPs utilisation): the FLOPs of one step, counted once per model and batch with "
            "torch.utils.flop_counter.FlopCounterMode on a warm-up step of an eager path (matmuls and convolutions, "
            "forward and backward, a multiply-add = 2 FLOPs; the same count for every path), divided by the "
            "path's fastest step time and by a peak: on a GPU its datasheet's dense fp16/bf16 tensor-core peak "
            "(the same for every path), on a CPU the faster of a large (2048x2048) matmul and a 3x3 convolution "
            "measured in the path's own dtype (a CPU has no datasheet figure; sections measured before 2026-12-02 "
            "used the matmul alone); the line under the tables names it.",
            "",
            bench_train.format_table(t),
            "",
        ]
        for m in t["models"]:
            if m.get("compile_error"):
                lines.append(f"torch.compile of {m['model']} (batch {m['batch_per_process']}) failed on this machine "
                             f"({m['compile_error']}).")
        compiled = [m for m in t["models"] if "compiled" in m["paths"]]
        for m in compiled:
            w = m["paths"]["compiled"].get("warmup_seconds_incl_compile")
            if w is not None:
                lines.append(f"torch.compile of {m['model']} (batch {m['batch_per_process']}): the {m['warmup']} "
                             f"warm-up steps took {w:.0f} s"
                             f"{_COMPILE_CACHE.get(m['paths']['compiled'].get('compile_cache'), '')}.")
        lines += [""] + _conv_breakdown(t) + _loss_curves(t) + [""]

    if "partial_fc" in result:
        pfc = result["partial_fc"]
        png = f"benchmarks_partial_fc{'' if kind == 'cpu' else '_' + kind}.png"
        short_title = DEVICE_TITLES.get(kind, kind).split(":")[0] + (" (emulated)" if info.get("isa_limits") else "")
        bench_partial_fc.plot(pfc, str(target / png), title_suffix=f" ({short_title})")
        precision = next((c.get("precision") for c in pfc["cases"] if c.get("precision")), "?")
        rounds = (f", in each of {pfc['rounds']} rounds that alternate ours and the reference"
                  if pfc.get("rounds", 1) > 1 else "")
        lines += [
            "### (b) PartialFC step",
            "",
            *_measured(pfc, info, result),
            f"Loss, backward and SGD step (momentum 0.9, weight decay 5e-4) of the margin-softmax head for a "
            f"global batch of 512-d embeddings; logits in {precision}; the fastest of {pfc['steps']} steps after "
            f"{pfc['warmup']} warm-up{rounds}. *ours*: PartialFC + the sampled-row optimizer; *reference*: the sampled rows "
            "gathered from a full Parameter (dense gradient), F.cross_entropy, torch.optim.SGD over the whole shard. "
            "Peak memory: above the process's state before the head was built (CPU: resident-set high-water mark, "
            "each case in a fresh process; CUDA: max_memory_allocated).",
            "",
            bench_partial_fc.format_table(pfc),
            "",
            f"![PartialFC samples/s and peak memory against the class count]({png})",
            "",
        ]

    if "partial_fc_bf16_state" in result:
        pfc16 = result["partial_fc_bf16_state"]
        lines += [
            "### (b2) PartialFC step with bfloat16 class-centre state",
            "",
            *_measured(pfc16, info, result),
            "As (b), with ours' momentum kept in bfloat16 (`fc_state_dtype=\"bfloat16\"`: stochastic rounding, the "
            "sampled rows' gradient held as factors; docs/memory.md); the centres stay float32 and the reference "
            "keeps float32 momentum.",
            "",
            bench_partial_fc.format_table(pfc16),
            "",
        ]

    if "partial_fc_chunked" in result:
        chunked = result["partial_fc_chunked"]
        lines += [
            "### (b3) PartialFC with the logits a block of rows at a time",
            "",
            *_measured(chunked, info, result),
            f"As (b) at a large global batch (what every rank sees: batch per GPU x GPUs), ours also with "
            f"`logits_chunk_rows={chunked.get('logits_chunk_rows')}` (losses/chunked_logits.py: the loss and both "
            "gradients computed a block of rows at a time in the forward, no [batch x sampled classes] logits; "
            "docs/memory.md). This is what lets 1B identities fit 64 GPUs of 80 GB.",
            "",
            bench_partial_fc.format_chunked_table(chunked),
            "",
        ]

    if "inference" in result:
        lines += [
            "### (c) Inference",
            "",
            *_measured(result["inference"], info, result),
            "Embedding batches of 112x112 images: PyTorch eval (fp32, and the default channels_last + autocast "
            "path) against onnxruntime on the exported model.onnx; the fastest batch of each path.",
            "",
            bench_inference.format_table(result["inference"]),
            "",
        ]
        if bench_inference.format_protocol(result["inference"]):
            lines += [bench_inference.format_protocol(result["inference"]), ""]

    if "data" in result:
        lines += ["### (d) Data path", "", *_measured(result["data"], info, result), bench_data.format_table(result["data"]), ""]
    return lines


# Measurements that are not part of one device's suite, each in its own file under
# <results>/extra/ (written by the tool named in its section; rendered when present).
EXTRA_DIR = "extra"


def _extra_loss_demo(result: dict) -> list[str]:
    from bench.loss_demo import markdown

    return ["### The demo trained with each margin loss", "",
            "`python bench/loss_demo.py` (the synthetic-faces demo, held-out verification accuracy before and "
            f"after training; measured {result.get('date', '?')}, accuracy figures, so the machine's load does "
            "not change them):", "", markdown(result["results"]), ""]


def _extra_partial_fc_losses(result: dict) -> list[str]:
    from bench.bench_partial_fc import format_loss_table

    about = [f"ours only, batch {result['batch']}, D={result['embedding_size']}",
             f"class-centre state {result.get('fc_state_dtype', 'float32')}", "the losses taking turns"]
    if result.get("machine", {}).get("date"):
        about.append(f"measured {result['machine']['date']}")
    if result.get("note"):
        about.append(result["note"])
    return ["### The PartialFC head's step time per margin loss", "",
            f"`python bench/bench_partial_fc.py --loss ... --rounds {result.get('rounds', 1)}` "
            f"({'; '.join(about)}):", "", format_loss_table(result), ""]


def _extra_distill_measure(result: dict) -> list[str]:
    from bench.distill_demo import format_measure

    teacher = result["models"]["teacher"]["network"]
    return [f"### Distillation on the synthetic faces (teacher {teacher})", "",
            "`python bench/distill_demo.py measure` (accuracy figures; docs/distillation.md explains them):", "",
            format_measure(result), ""]


def _extra_distill_cost(result: dict) -> list[str]:
    machine = result.get("machine", {})
    where = result["device"]
    if machine.get("cpu_kind"):
        where = f"{device_title(machine['cpu_kind'], machine)}; {machine.get('cpu_cores')} cores, {machine.get('date')}"
    elif machine.get("gpu"):
        where = f"{machine['gpu']}, {machine.get('date')}"
    return [f"### What the teacher costs per step ({result['precision']})", "",
            f"`python bench/distill_demo.py cost` on {where}; precision {result['precision']}, batch "
            f"{result['batch_size']}, the two steps interleaved (fastest step of each):", "",
            "| student | teacher | samples/s alone | samples/s with the teacher | step time |",
            "| --- | --- | ---: | ---: | ---: |",
            f"| {result['student']} | {result['teacher']} | {result['without_teacher']['samples_per_s']:.1f} | "
            f"{result['with_teacher']['samples_per_s']:.1f} | {result['slowdown']:.2f}x |", "",
            *([f"*{result['note']}*", ""] if result.get("note") else [])]


EXTRAS = {
    "loss_demo": _extra_loss_demo,
    "partial_fc_losses": _extra_partial_fc_losses,
    "distill_demo": _extra_distill_measure,
    "distill_cost": _extra_distill_cost,
}


def render_extras(folder: Path) -> list[str]:
    """One subsection per result file in `folder` whose name starts with a key of EXTRAS."""
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    lines: list[str] = []
    for key, render_one in EXTRAS.items():
        for path in (p for p in files if p.stem.startswith(key)):
            lines += render_one(json.loads(path.read_text()))
    return (["## Other measurements", ""] + lines) if lines else []


def render(results_dir: Path, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    files = {p.stem: p for p in sorted(Path(results_dir).glob("*.json"))}
    try:
        shown = Path(results_dir).resolve().relative_to(ROOT)
    except ValueError:
        shown = Path(results_dir)
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python bench/run_all.py` (`make bench`) from the result files in "
        f"`{shown}/`; a CUDA "
        "machine adds its section with `python bench/run_all.py --device cuda`. Every benchmark compares its "
        "paths in one run on the same inputs, with their steps interleaved; times are the fastest step of each "
        "path (other load only ever slows a step down).",
        "",
    ]
    order = [k for k in DEVICE_ORDER if k in files] + [k for k in files if k not in DEVICE_ORDER]
    if not order:
        lines.append("No results yet: run `python bench/run_all.py`.")
    for kind in order:
        lines += render_device(kind, json.loads(files[kind].read_text()), target)
    lines += render_extras(Path(results_dir) / EXTRA_DIR)
    from utils.atomic_file import atomic_write

    md = target / "benchmarks.md"
    with atomic_write(md, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    return md
