"""Training-step throughput: the default fast path against the plain eager fp32 step.

One step = forward of the backbone, PartialFC margin-softmax loss, backward, gradient
clipping and the optimizer step, on the same batches from the same initial weights:

  reference   eager fp32, NCHW, torch.optim.SGD (its default implementation), the loss read
              on the host every step -- how insightface's arcface_torch trains on a CPU.
  default     train.py's own step (training.step.TrainStep, with its non-finite guard) with
              train.py's defaults: channels_last where the backbone prefers it, autocast in
              the device's default precision (bf16 on CPUs with bf16 units, fp16 + GradScaler
              on CUDA), fused SGD, non-blocking host-to-device copies, no host
              synchronisation in the step.
  compiled    default + torch.compile of the backbone (the config's compile=True).

The paths' steps are interleaved (step i of every path, then step i+1), so other load on
the machine slows them alike. Besides samples/s it records every path's loss at each step
and reports the largest relative difference from the reference's loss curve.

    python bench/bench_train.py [--models mbf r18 r50] [--batch-size 32] [--steps 5] [--warmup 2]
                                [--paths reference default compiled] [--device cpu|cuda] [--quick]
Under torchrun each process runs the batch size given (the PartialFC head is sharded).
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

if __package__ in (None, ""):
    import _repo_path  # noqa: F401  (puts the repository root on sys.path)

from bench.common import enable_huge_pages, default_precision, summarize, synchronize, timed  # noqa: E402

PATHS = ("reference", "default", "compiled")
NUM_CLASSES = 10_000
CLIP_NORM = 5.0


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
    """One way of running the training step; holds its own model, head and optimizer."""

    def __init__(self, kind: str, backbone, head_weight, ctx, device):
        import torch

        from losses import CombinedMarginLoss, PartialFC
        from losses.optim import build_optimizer
        from training.guard import NonFiniteGuard
        from training.step import TrainStep, trainable_parameters
        from utils.distributed import wrap_ddp

        self.kind, self.device, self.ctx = kind, device, ctx
        self.losses: list = []
        self.times: list[float] = []
        fast = kind != "reference"
        self.precision = default_precision(device) if fast else None
        self.backbone = copy.deepcopy(backbone).to(device)
        channels_last = fast and self.backbone.prefers_channels_last  # as train.py decides it
        if channels_last:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        self.head = PartialFC(
            CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), 512, NUM_CLASSES, 1.0,
            matmul_dtype=self.precision.autocast_dtype if fast else None,
            rank=ctx.rank, world_size=ctx.world_size, check_labels=not (fast and device.type == "cuda"),
        ).to(device)
        with torch.no_grad():
            self.head.weight.copy_(head_weight[self.head.class_start : self.head.class_start + self.head.num_local])
        model = torch.compile(self.backbone) if kind == "compiled" else self.backbone
        if ctx.is_distributed:
            model = wrap_ddp(model, ctx)
        self.model = model
        self.backbone.train()
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
        scaler = torch.amp.GradScaler(device.type) if self.precision.use_grad_scaler else None
        self.train_step = TrainStep(
            model, self.backbone, self.head, optimizer,
            guard=NonFiniteGuard(0, device, self.backbone.buffers()),
            autocast_dtype=self.precision.autocast_dtype, scaler=scaler, clip_grad_norm=CLIP_NORM,
            channels_last=channels_last, distributed=ctx.is_distributed,
        )

    def step(self, images, labels) -> None:
        import torch

        if self.kind == "reference":  # a plain eager fp32 step, written out
            images, labels = images.to(self.device), labels.to(self.device)
            loss = self.head(self.model(images), labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.backbone.parameters(), CLIP_NORM)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.losses.append(loss.item())  # insightface's loss meter reads it every step
            return

        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
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


def run_model(name: str, *, batch: int, steps: int, warmup: int, paths, ctx, device, log=print) -> dict:
    import torch

    from backbones import get_model

    torch.manual_seed(0)
    backbone = get_model(name, num_features=512)
    head_weight = torch.normal(0.0, 0.01, (NUM_CLASSES, 512))
    runners = [_Path(kind, backbone, head_weight, ctx, device) for kind in paths]
    batches = _make_batches(warmup + steps, batch, NUM_CLASSES, seed=1 + ctx.rank, pin=device.type == "cuda")
    compile_seconds = None
    for i, (images, labels) in enumerate(batches):
        this_step = []
        for runner in runners:
            seconds = timed(lambda: runner.step(images, labels), device)
            this_step.append(f"{runner.kind} {seconds:.2f}s")
            if i >= warmup:
                runner.times.append(seconds)
            elif runner.kind == "compiled":
                compile_seconds = (compile_seconds or 0.0) + seconds
        log(f"  {name} step {i + 1}/{len(batches)}{' (warm-up)' if i < warmup else ''}: " + ", ".join(this_step))
    synchronize(device)
    breakdown = {}
    if device.type == "cpu" and not ctx.is_distributed:
        images, labels = batches[-1]
        breakdown = {runner.kind: _conv_share(runner, images, labels) for runner in runners}
    world = ctx.world_size
    result = {"model": name, "batch_per_process": batch, "world_size": world, "warmup": warmup, "paths": {}}
    reference_losses = None
    for runner in runners:
        losses = [float(x) for x in runner.losses]
        entry = summarize(runner.times)
        entry["samples_per_s"] = batch * world / entry["min_s"]
        entry["losses"] = losses
        entry["precision"] = runner.precision.name if runner.precision else "fp32"
        if runner.kind == "compiled":
            entry["warmup_seconds_incl_compile"] = compile_seconds
        if runner.kind in breakdown:
            entry["profiled_step"] = breakdown[runner.kind]
        result["paths"][runner.kind] = entry
        if runner.kind == "reference":
            reference_losses = losses
    for kind, entry in result["paths"].items():
        if reference_losses is not None and kind != "reference":
            entry["max_rel_loss_diff"] = max(
                abs(a - b) / abs(b) for a, b in zip(entry["losses"], reference_losses)
            )
            entry["speedup"] = entry["samples_per_s"] / result["paths"]["reference"]["samples_per_s"]
    del runners
    return result


def run(models, *, batch=32, steps=5, warmup=2, paths=PATHS, device="auto", log=print) -> dict:
    from utils.distributed import cleanup_distributed, init_distributed

    ctx = init_distributed(timeout_minutes=10, device=None if device == "auto" else device)
    try:
        results = [run_model(m, batch=batch, steps=steps, warmup=warmup, paths=paths, ctx=ctx,
                             device=ctx.device, log=log if ctx.is_main else (lambda *_: None)) for m in models]
    finally:
        cleanup_distributed()
    return {"models": results, "num_classes": NUM_CLASSES, "steps": steps, "warmup": warmup,
            "world_size": ctx.world_size, "is_main": ctx.is_main}


def format_table(result: dict) -> str:
    paths = [p for p in PATHS if any(p in m["paths"] for m in result["models"])]
    compared = [p for p in paths if p != "reference"] if "reference" in paths else []
    header = ["model", "batch/process"] + [f"{p} samples/s" for p in paths]
    header += [f"{p} speed-up" for p in compared] + [f"{p} max loss diff" for p in compared]
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    for m in result["models"]:
        cells = [m["model"], str(m["batch_per_process"])]
        for p in paths:
            e = m["paths"].get(p)
            cells.append(f"{e['samples_per_s']:.1f} ({e['precision']})" if e else "-")
        for p in compared:
            e = m["paths"].get(p)
            cells.append(f"{e['speedup']:.2f}x" if e and "speedup" in e else "-")
        for p in compared:
            e = m["paths"].get(p)
            cells.append(f"{100 * e['max_rel_loss_diff']:.2f}%" if e and "max_rel_loss_diff" in e else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["mbf", "r18", "r50"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="mbf only, batch 8, 2 steps, no compile (smoke test)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
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
