"""Training-step throughput: train.py's step against insightface's own GPU step and the
plain eager fp32 step, with the model-FLOPs utilisation (MFU) of each.

One step = forward of the backbone, PartialFC margin-softmax loss, backward, gradient
clipping and the optimizer step, on the same batches from the same initial weights:

  reference   eager fp32, NCHW, torch's nn.Conv2d and nn.PReLU (not the CPU routes of
              backbones.conv and backbones.activation), torch.optim.SGD (its default
              implementation), the loss read on the host every step, cuDNN's default
              algorithm choice -- insightface's arcface_torch as it runs on a CPU (its
              fp16 flag only acts on CUDA).
  insightface CUDA only: insightface's GPU path (bench/insightface_reference.py): the
              backbone built with fp16=True (its trunk under float16 autocast, the
              embedding layer in float32), NCHW, cudnn.benchmark=True through
              configure_like_insightface(), the dense PartialFC_V2 head (a full Parameter,
              normalise + linear under float16 autocast), torch.optim.SGD, GradScaler
              (growth_interval=100), clipping at 5 and the loss read every step.
              On a CPU the path is skipped and the result says why (`skipped_paths`):
              insightface's fp16=True is CUDA autocast (torch.cuda.amp), which leaves CPU
              ops in float32, so there its step *is* the reference step above; running it
              in bf16 instead would be a path insightface does not have.
  default     train.py's own step (training.step.TrainStep, with its non-finite guard) with
              train.py's defaults: channels_last where the backbone prefers it, autocast in
              the device's default precision (bf16 on CPUs with bf16 units, fp16 + GradScaler
              on CUDA), fused SGD, non-blocking host-to-device copies, no host
              synchronisation in the step, cudnn.benchmark=True (cfg.cudnn_benchmark).
  compiled    default + torch.compile of the backbone (the config's compile=True).

cudnn.benchmark is a process-wide switch, so it is set before every step of each path to
that path's own setting (cuDNN keeps its timing cache either way).

The paths' steps are interleaved (step i of every path, then step i+1), so other load on
the machine slows them alike. Besides samples/s it records every path's loss at each step
and reports the largest relative difference from the reference's loss curve, and the
speed-ups against the reference and (on CUDA) against the insightface path.

MFU: the FLOPs of one step are counted once per model and batch, with
torch.utils.flop_counter.FlopCounterMode on the first warm-up step of the first eager
path (reference, else insightface, else default): matmuls and convolutions, forward and
backward, a multiply-add = 2 FLOPs. Every path does the same model FLOPs, so that one
count serves them all (`step_flops`, `flops_counted_on`). MFU = step FLOPs / the path's
fastest step time / the peak. CUDA: the GPU's dense fp16/bf16 tensor-core peak from its
datasheet (insightface_reference.peak_flops), the same peak for every path, named in the
result; a GPU missing from that list gets no MFU. CPU: there is no datasheet peak, so the
peak is a *measured* ceiling in the path's own dtype (fp32 or bf16), measured once per
process: the faster of a large square matmul and a 3x3 convolution (MKL's fp32 matmul is
slow on AMD CPUs, where oneDNN's convolutions run 2.7x faster), named in the result
("measured N GFLOP/s fp32: the faster of ..."). A CPU MFU says how close the step comes
to what the cores reach on their best dense kernel.

    python bench/bench_train.py [--models mbf r18 r50] [--batch-size 32] [--steps 5] [--warmup 2]
                                [--paths reference insightface default compiled] [--device cpu|cuda]
                                [--quick]
Under torchrun each process runs the batch size given (the PartialFC head is sharded); its
FLOPs and MFU are those of one process (one GPU).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import time
from pathlib import Path

if __package__ in (None, ""):
    import _repo_path  # noqa: F401  (puts the repository root on sys.path)

from bench.common import enable_huge_pages, default_precision, summarize, synchronize, timed  # noqa: E402

PATHS = ("reference", "insightface", "default", "compiled")
NUM_CLASSES = 10_000
CLIP_NORM = 5.0
MISSING = "—"  # a table cell for a figure the result does not have (e.g. older result files)
# Where the step's FLOPs are counted: the first of these that runs (an eager path: a
# compiled graph under FlopCounterMode would be re-traced).
FLOP_COUNT_ORDER = ("reference", "insightface", "default")
INSIGHTFACE_CPU_SKIP = (
    "CUDA only: insightface's fp16=True is CUDA autocast (torch.cuda.amp), which leaves CPU ops in float32, "
    "so on a CPU its step is the eager fp32 reference"
)


def _make_batches(count: int, batch: int, num_classes: int, seed: int, pin: bool):
    """Normalised 112x112 RGB batches on the host, normalised as the data loader does it."""
    import torch

    from dataset.transforms import normalize_batch

    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        images = normalize_batch(torch.randint(0, 256, (batch, 3, 112, 112), generator=g, dtype=torch.uint8))
        labels = torch.randint(0, num_classes, (batch,), generator=g)
        if pin:
            images, labels = images.pin_memory(), labels.pin_memory()
        batches.append((images, labels))
    return batches


class _Path:
    """One way of running the training step; holds its own model, head and optimizer.

    `insightface_fp16`: the insightface path's fp16 flag; by default on where insightface
    has it (CUDA). Tests set it on a CPU to run the same code there (fp16=True then means
    the backbones' CPU half precision, bf16, and a GradScaler that never needs to act).
    """

    def __init__(self, kind: str, name: str, backbone, head_weight, ctx, device, *,
                 insightface_fp16: bool | None = None):
        import torch

        self.kind, self.device, self.ctx = kind, device, ctx
        self.losses: list = []
        self.times: list[float] = []
        self.cudnn_benchmark = kind != "reference"  # insightface's and train.py's default; torch's is off
        if kind == "insightface":
            self._build_insightface(name, backbone, head_weight,
                                    device.type == "cuda" if insightface_fp16 is None else insightface_fp16)
            return

        from losses import CombinedMarginLoss, PartialFC
        from losses.optim import build_optimizer
        from training.guard import NonFiniteGuard
        from training.step import TrainStep, trainable_parameters
        from utils.torch_compile import compile_module

        fast = kind != "reference"
        precision = default_precision(device) if fast else None
        self.precision = precision.name if fast else "fp32"
        self.backbone = copy.deepcopy(backbone).to(device)
        if not fast:
            from bench.insightface_reference import with_stock_modules

            with_stock_modules(self.backbone)
        channels_last = fast and self.backbone.prefers_channels_last  # as train.py decides it
        if channels_last:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        self.head = PartialFC(
            CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), 512, NUM_CLASSES, 1.0,
            matmul_dtype=precision.autocast_dtype if fast else None,
            rank=ctx.rank, world_size=ctx.world_size, check_labels=not (fast and device.type == "cuda"),
        ).to(device)
        self._copy_centres(head_weight)
        self.model = self._wrap(compile_module(self.backbone) if kind == "compiled" else self.backbone)
        if not fast:
            self.optimizer = torch.optim.SGD(
                [{"params": self.backbone.parameters()}, {"params": self.head.parameters()}],
                lr=0.1, momentum=0.9, weight_decay=5e-4,
            )
            return
        optimizer = build_optimizer(
            "sgd", trainable_parameters(self.backbone), self.head.parameters(), lr=0.1, weight_decay=5e-4,
            momentum=0.9, device_type=device.type,
        )
        scaler = torch.amp.GradScaler(device.type) if precision.use_grad_scaler else None
        self.train_step = TrainStep(
            self.model, self.backbone, self.head, optimizer,
            guard=NonFiniteGuard(0, device, self.backbone.buffers()),
            autocast_dtype=precision.autocast_dtype, scaler=scaler, clip_grad_norm=CLIP_NORM,
            channels_last=channels_last, distributed=self.ctx.is_distributed,
        )

    def _build_insightface(self, name: str, backbone, head_weight, fp16: bool) -> None:
        from backbones import get_model
        from bench.insightface_reference import (
            InsightfaceMargin, InsightfacePartialFC, build_insightface_step, with_stock_modules)

        # Built with fp16 so that the trunk autocasts itself, then given the shared initial weights.
        self.backbone = with_stock_modules(get_model(name, num_features=512, fp16=fp16))
        self.backbone.load_state_dict(backbone.state_dict())
        self.backbone.to(self.device)  # NCHW
        self.head = InsightfacePartialFC(
            InsightfaceMargin(64.0, 1.0, 0.5, 0.0), 512, NUM_CLASSES, 1.0, fp16=fp16,
            rank=self.ctx.rank, world_size=self.ctx.world_size,
        ).to(self.device)
        self._copy_centres(head_weight)
        self.model = self._wrap(self.backbone)
        self.precision = ("fp16" if self.device.type == "cuda" else "bf16") if fp16 else "fp32"
        self.insightface_step, self.optimizer = build_insightface_step(
            self.model, self.head, fp16=fp16, clip_norm=CLIP_NORM, device_type=self.device.type,
        )

    def _copy_centres(self, head_weight) -> None:
        import torch

        with torch.no_grad():
            self.head.weight.copy_(head_weight[self.head.class_start : self.head.class_start + self.head.num_local])

    def _wrap(self, model):
        from utils.distributed import wrap_ddp

        self.backbone.train()
        return wrap_ddp(model, self.ctx) if self.ctx.is_distributed else model

    def _configure(self) -> None:
        import torch

        if self.device.type != "cuda":
            return
        if self.kind == "insightface":
            from bench.insightface_reference import configure_like_insightface

            configure_like_insightface()
        else:
            torch.backends.cudnn.benchmark = self.cudnn_benchmark

    def step(self, images, labels) -> None:
        import torch

        self._configure()
        if self.kind == "reference":  # a plain eager fp32 step, written out
            images, labels = images.to(self.device), labels.to(self.device)
            loss = self.head(self.model(images), labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.backbone.parameters(), CLIP_NORM)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.losses.append(loss.item())  # insightface's loss meter reads it every step
            return

        # Pinned host batches, copied without blocking (insightface's loader and train.py's alike).
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        if self.kind == "insightface":
            self.losses.append(self.insightface_step(images, labels))  # reads the loss: a host sync
            return
        self.train_step(images, labels)  # train.py's step
        self.losses.append(self.train_step.last_loss)  # on the device: read after the timing


def _conv_share(runner: _Path, images, labels) -> dict:
    """One extra step under the CPU profiler: seconds in convolutions (forward and backward)
    and in everything else, by the ops' own time. This is what bounds a speed-up: if the
    convolutions gain a factor k and take a share p of the reference step, no other
    optimisation takes the step past 1 / (p / k)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        runner.step(images, labels)
    conv = other = 0.0
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        if "conv" in event.key.lower():  # aten::mkldnn_convolution, aten::convolution_backward, inductor's
            conv += seconds
        else:
            other += seconds
    runner.losses.pop()  # the profiled step is not part of the loss curve
    return {"conv_s": conv, "other_s": other}


# The CPU's measured ceiling per dtype, measured once per process (every model of a run is
# divided by the same figure).
_MEASURED_PEAK: dict = {}
_PEAK_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def mfu_peak(device, precision: str) -> tuple[float, str] | None:
    """(peak FLOP/s, what it is) that a path's MFU is measured against; None: no peak known.

    CUDA: the datasheet's dense fp16/bf16 peak of the GPU, for every path (also the fp32
    one: MFU is against what the hardware offers). CPU: the measured ceiling in the path's
    dtype, the faster of a large matmul and a convolution (there is no datasheet figure for
    a CPU's sustained rate; insightface_reference.measured_peak_flops says why both)."""
    import torch

    from bench.insightface_reference import measured_peak_flops, peak_flops

    if device.type == "cuda":
        found = peak_flops(torch.cuda.get_device_name(device))
        return None if found is None else (found[0], f"{found[1]} ({found[0] / 1e12:,.0f} TFLOP/s)")
    if device.type != "cpu":
        return None
    if precision not in _MEASURED_PEAK:
        _MEASURED_PEAK[precision] = measured_peak_flops(getattr(torch, _PEAK_DTYPES[precision]), device, precision)
    return _MEASURED_PEAK[precision]


def _flop_counter_kind(kinds) -> str | None:
    return next((k for k in FLOP_COUNT_ORDER if k in kinds), None)


def skip_reason(kind: str, device, insightface_fp16: bool | None = None) -> str | None:
    """Why a path is not run on this device, or None."""
    if kind == "insightface" and device.type != "cuda" and insightface_fp16 is None:
        return INSIGHTFACE_CPU_SKIP
    return None


def run_model(name: str, *, batch: int, steps: int, warmup: int, paths, ctx, device, log=print,
              insightface_fp16: bool | None = None, profile: bool = True) -> dict:
    """One model at one batch size: every path's step times, losses, MFU and ratios.
    `profile`: on a CPU, one more step of each path under the profiler (`profiled_step`)."""
    import torch

    from backbones import get_model
    from bench.insightface_reference import count_step_flops, mfu, stock_modules

    if warmup < 1:
        raise ValueError(f"warmup must be at least 1 (the FLOPs are counted on a warm-up step), got {warmup}")
    skipped = {k: r for k in paths if (r := skip_reason(k, device, insightface_fp16)) is not None}
    kinds = [k for k in paths if k not in skipped]
    torch.manual_seed(0)
    backbone = get_model(name, num_features=512)
    head_weight = torch.normal(0.0, 0.01, (NUM_CLASSES, 512))
    runners = [_Path(kind, name, backbone, head_weight, ctx, device, insightface_fp16=insightface_fp16)
               for kind in kinds]
    batches = _make_batches(warmup + steps, batch, NUM_CLASSES, seed=1 + ctx.rank, pin=device.type == "cuda")
    counter_kind, step_flops = _flop_counter_kind(kinds), None
    cudnn_benchmark = torch.backends.cudnn.benchmark
    compile_seconds = None
    caches, compile_cache = contextlib.ExitStack(), None
    try:
        if "compiled" in kinds:
            cold, compile_cache = _cold_compile_cache()
            caches.enter_context(cold)
        for i, (images, labels) in enumerate(batches):
            this_step = []
            for runner in runners:
                if i == 0 and runner.kind == counter_kind:  # a warm-up step: its time is not kept
                    counted = []
                    with stock_modules(runner.backbone):  # the model's FLOPs, not our CPU routes'
                        seconds = timed(lambda: counted.append(count_step_flops(runner.step, images, labels)), device)
                    step_flops = counted[0]
                else:
                    seconds = timed(lambda: runner.step(images, labels), device)
                this_step.append(f"{runner.kind} {seconds:.2f}s")
                if i >= warmup:
                    runner.times.append(seconds)
                elif runner.kind == "compiled":
                    compile_seconds = (compile_seconds or 0.0) + seconds
            log(f"  {name} step {i + 1}/{len(batches)}{' (warm-up)' if i < warmup else ''}: " + ", ".join(this_step))
        synchronize(device)
        breakdown = {}
        if profile and device.type == "cpu" and not ctx.is_distributed:
            images, labels = batches[-1]
            breakdown = {runner.kind: _conv_share(runner, images, labels) for runner in runners}
    finally:
        caches.close()
        torch.backends.cudnn.benchmark = cudnn_benchmark
    world = ctx.world_size
    result = {"model": name, "batch_per_process": batch, "world_size": world, "warmup": warmup, "paths": {},
              "step_flops": step_flops, "flops_counted_on": counter_kind}
    if skipped:
        result["skipped_paths"] = skipped
    for runner in runners:
        entry = summarize(runner.times)
        entry["samples_per_s"] = batch * world / entry["min_s"]
        entry["losses"] = [float(x) for x in runner.losses]
        entry["precision"] = runner.precision
        peak = mfu_peak(device, runner.precision) if step_flops else None
        entry["mfu"] = mfu(step_flops, entry["min_s"], peak[0]) if peak else None
        entry["mfu_peak_flops"] = peak[0] if peak else None
        entry["mfu_peak"] = peak[1] if peak else ("n/a: no eager path to count FLOPs on" if not step_flops else
                                                  f"n/a: no peak known for {_device_name(device)!r}")
        if runner.kind == "compiled":
            entry["warmup_seconds_incl_compile"] = compile_seconds
            entry["compile_cache"] = compile_cache
        if runner.kind in breakdown:
            entry["profiled_step"] = breakdown[runner.kind]
        result["paths"][runner.kind] = entry
    _add_ratios(result["paths"])
    del runners
    return result


def _cold_compile_cache() -> tuple[contextlib.AbstractContextManager, str]:
    """(a context, what it gives): torch.compile's caches (inductor's on-disk FX graph and
    kernel caches, and the in-memory ones) emptied and pointed at a fresh temporary directory
    while a model's paths run, so that the compiled path's warm-up time is what a first
    compile=True run costs, not what a rerun on the same machine costs (r50 on a 2-core AMD
    EPYC: 89 s cold, 27 s with the cache of the run before). torch's own context manager for
    it is private (torch._inductor.utils.fresh_cache); without it the cache is left as found."""
    try:
        from torch._inductor.utils import fresh_cache
    except ImportError:
        return contextlib.nullcontext(), "as found"
    return fresh_cache(), "empty"


def _device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _add_ratios(paths: dict) -> None:
    """Each path's loss-curve difference and speed-up against the reference; ours
    (default, compiled) against the insightface path too."""
    reference, insightface = paths.get("reference"), paths.get("insightface")
    for kind, entry in paths.items():
        if reference is not None and kind != "reference":
            entry["max_rel_loss_diff"] = max(
                abs(a - b) / abs(b) for a, b in zip(entry["losses"], reference["losses"])
            )
            entry["speedup"] = entry["samples_per_s"] / reference["samples_per_s"]
        if insightface is not None and kind in ("default", "compiled"):
            entry["speedup_vs_insightface"] = entry["samples_per_s"] / insightface["samples_per_s"]


def run(models, *, batch=32, steps=5, warmup=2, paths=PATHS, device="auto", log=print,
        insightface_fp16: bool | None = None, profile: bool = True) -> dict:
    from utils.distributed import cleanup_distributed, init_distributed

    ctx = init_distributed(timeout_minutes=10, device=None if device == "auto" else device)
    try:
        results = [run_model(m, batch=batch, steps=steps, warmup=warmup, paths=paths, ctx=ctx,
                             device=ctx.device, log=log if ctx.is_main else (lambda *_: None),
                             insightface_fp16=insightface_fp16, profile=profile) for m in models]
    finally:
        cleanup_distributed()
    return {"models": results, "num_classes": NUM_CLASSES, "steps": steps, "warmup": warmup,
            "world_size": ctx.world_size, "is_main": ctx.is_main}


# ---- the tables ---------------------------------------------------------------------------

def _shown_paths(result: dict) -> list[str]:
    return [p for p in PATHS if any(p in m["paths"] or p in m.get("skipped_paths", {}) for m in result["models"])]


def _cell(entry: dict | None, key: str, fmt) -> str:
    value = entry.get(key) if entry else None
    return MISSING if value is None else fmt(value)


def format_table(result: dict) -> str:
    """Two markdown tables (throughput with MFU; ratios with the loss-curve difference) and
    the lines that name the MFU peaks and the skipped paths. Figures a result file lacks
    (files from before a column existed) are shown as MISSING."""
    paths = _shown_paths(result)
    measured = [p for p in paths if any(p in m["paths"] for m in result["models"])]
    compared = [p for p in measured if p != "reference"] if "reference" in measured else []
    ours_vs_insightface = [p for p in ("default", "compiled") if p in measured] if "insightface" in measured else []
    models = result["models"]

    def row(cells):
        return "| " + " | ".join(cells) + " |"

    header = ["model", "batch/process"] + [f"{p} samples/s" for p in paths] + [f"{p} MFU" for p in paths]
    lines = [row(header), "| --- |" + " ---: |" * (len(header) - 1)]
    for m in models:
        cells = [m["model"], str(m["batch_per_process"])]
        for p in paths:
            e = m["paths"].get(p)
            if e is None:
                cells.append("skipped" if p in m.get("skipped_paths", {}) else MISSING)
            else:
                cells.append(f"{e['samples_per_s']:.1f} ({e['precision']})")
        cells += [_cell(m["paths"].get(p), "mfu", lambda v: f"{100 * v:.1f}%") for p in paths]
        lines.append(row(cells))

    if compared:
        header = (["model", "batch/process"] + [f"{p} vs eager fp32" for p in compared]
                  + [f"{p} vs insightface" for p in ours_vs_insightface] + [f"{p} max loss diff" for p in compared])
        lines += ["", row(header), "| --- |" + " ---: |" * (len(header) - 1)]
        for m in models:
            cells = [m["model"], str(m["batch_per_process"])]
            cells += [_cell(m["paths"].get(p), "speedup", lambda v: f"{v:.2f}x") for p in compared]
            cells += [_cell(m["paths"].get(p), "speedup_vs_insightface", lambda v: f"{v:.2f}x")
                      for p in ours_vs_insightface]
            cells += [_cell(m["paths"].get(p), "max_rel_loss_diff", lambda v: f"{100 * v:.2f}%") for p in compared]
            lines.append(row(cells))

    peaks = {}
    for m in models:
        for p, e in m["paths"].items():
            if e.get("mfu_peak"):
                peaks.setdefault(p, [])
                if e["mfu_peak"] not in peaks[p]:
                    peaks[p].append(e["mfu_peak"])
    notes = []
    if peaks:
        counted = sorted({m["flops_counted_on"] for m in models if m.get("flops_counted_on")})
        notes.append(
            f"MFU: the step's FLOPs counted once per model and batch on the {'/'.join(counted)} path's first warm-up "
            "step (FlopCounterMode: matmuls and convolutions, forward and backward; the same count for every path), "
            "over the fastest step time and the peak -- "
            + "; ".join(f"{p}: {' / '.join(labels)}" for p, labels in peaks.items()) + "."
        )
    skipped = {}
    for m in models:
        for p, reason in m.get("skipped_paths", {}).items():
            skipped.setdefault(p, reason)
    notes += [f"{p} skipped: {reason}." for p, reason in skipped.items()]
    if notes:
        lines += [""] + notes
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["mbf", "r18", "r50"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="at least 1 (the FLOPs are counted on a warm-up step)")
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="mbf only, batch 8, 2 steps, no compile (smoke test)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error(f"--warmup must be at least 1, got {args.warmup}")
    enable_huge_pages()  # as train.py does
    if args.quick:
        args.models, args.batch_size, args.steps, args.warmup = ["mbf"], 8, 2, 1
        args.paths = [p for p in args.paths if p != "compiled"]
    start = time.perf_counter()
    result = run(args.models, batch=args.batch_size, steps=args.steps, warmup=args.warmup, paths=args.paths,
                 device=args.device)
    if result["is_main"]:
        print(format_table(result))
        print(f"({time.perf_counter() - start:.0f} s)")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
