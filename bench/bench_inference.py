"""Inference throughput: the PyTorch eval path against onnxruntime on the exported model.

  torch fp32      model.eval() under torch.inference_mode, NCHW, float32.
  torch default   the evaluation path of training: channels_last and autocast in the
                  device's default precision (bf16 on CPUs with bf16 units, fp16 on CUDA).
  onnxruntime     the model exported by eval.onnx_export (what train.py writes as
                  model.onnx), run by onnxruntime (CUDA provider when installed and
                  --device cuda, else the CPU provider).

All paths embed the same normalised batches, interleaved batch by batch; besides images/s
the table gives the smallest cosine similarity of each path's embeddings to torch fp32's.

    python bench/bench_inference.py [--models mbf r18 r50] [--batch-size 32] [--batches 6] [--device cpu|cuda] [--quick]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import tempfile
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script
    import _repo_path  # noqa: F401  (puts the repository root on sys.path)

from bench.common import enable_huge_pages, default_precision, resolve_device, summarize, timed  # noqa: E402

PATHS = ("torch fp32", "torch default", "onnxruntime")


def _onnx_session(path: str, device):
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(path, providers=providers)
    return session, session.get_providers()[0]


def _with_data_statistics(model, batches):
    """The model in eval mode with BatchNorm statistics of `batches`.

    With the initial running statistics (mean 0, variance 1) a deep untrained IResNet's
    activations grow block by block until they overflow; a trained model's statistics
    match its inputs, which a few cumulative training-mode passes reproduce.
    """
    import torch

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the passes
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    for m in norms:
        m.momentum = 0.1
    return model.eval()


def run_model(name: str, *, batch: int, batches: int, warmup: int, device, log=print) -> dict:
    import numpy as np
    import torch

    from backbones import get_model
    from dataset.transforms import normalize_batch
    from eval.onnx_export import export_onnx

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    # uint8 images through the one input normalisation, as every inference path receives them.
    images = [torch.randint(0, 256, (batch, 3, 112, 112), generator=g, dtype=torch.uint8) for _ in range(warmup + batches)]
    inputs = [normalize_batch(x) for x in images]
    plain = _with_data_statistics(get_model(name, num_features=512), inputs[:2]).to(device)
    precision = default_precision(device)
    channels_last = plain.prefers_channels_last  # the backbone decides, as in training
    fast = copy.deepcopy(plain)
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)

    with tempfile.TemporaryDirectory() as tmp:
        with warnings.catch_warnings():  # the backbones' input-size check is constant in the trace
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            onnx_path = str(export_onnx(plain, Path(tmp) / f"{name}.onnx", check=False))  # a CPU fp32 copy
        session, provider = _onnx_session(onnx_path, device)

        def torch_fp32(x):
            with torch.inference_mode():
                return plain(x.to(device, non_blocking=True)).float().cpu().numpy()

        def torch_default(x):
            x = x.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            autocast = (torch.autocast(device.type, dtype=precision.autocast_dtype)
                        if precision.low_precision else contextlib.nullcontext())
            with torch.inference_mode(), autocast:
                return fast(x).float().cpu().numpy()

        def onnxruntime(x):
            return session.run(None, {"data": x.numpy()})[0]

        paths = {"torch fp32": torch_fp32, "torch default": torch_default, "onnxruntime": onnxruntime}
        times = {p: [] for p in paths}
        outputs = {p: [] for p in paths}
        for i, x in enumerate(inputs):
            for p, fn in paths.items():
                seconds = timed(lambda: outputs[p].append(fn(x)), device)
                if i >= warmup:
                    times[p].append(seconds)
        log(f"  {name}: " + ", ".join(f"{p} {batch / min(t):.0f} img/s" for p, t in times.items()))

    def min_cosine(a, b):
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        b = b / np.linalg.norm(b, axis=1, keepdims=True)
        return float((a * b).sum(axis=1).min())

    result = {"model": name, "batch": batch, "onnx_provider": provider,
              "torch_default_precision": precision.name, "paths": {}}
    ref = np.concatenate(outputs["torch fp32"])
    for p in paths:
        entry = summarize(times[p])
        entry["images_per_s"] = batch / entry["min_s"]
        entry["min_cosine_vs_torch_fp32"] = min_cosine(np.concatenate(outputs[p]), ref)
        result["paths"][p] = entry
    return result


def time_protocol(pairs: int = 6000, dim: int = 512, repeats: int = 3) -> dict:
    """Seconds of eval.verification.evaluate (10 folds, thresholds for accuracy and VAL@FAR)
    on `pairs` pairs of seeded embeddings: an LFW-sized set (6,000 pairs, 12,000 images)."""
    import numpy as np

    from eval.verification import evaluate

    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((2 * pairs, dim)).astype(np.float32)
    issame = np.arange(pairs) % 2 == 0
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        evaluate(embeddings, issame, nrof_folds=10)
        times.append(time.perf_counter() - start)
    return {"pairs": pairs, "dim": dim, "seconds": min(times)}


def run(models, *, batch=32, batches=6, warmup=2, device="auto", log=print) -> dict:
    dev = resolve_device(device)
    results = [run_model(m, batch=batch, batches=batches, warmup=warmup, device=dev, log=log) for m in models]
    protocol = time_protocol()
    log(f"  10-fold protocol on {protocol['pairs']} pairs: {protocol['seconds']:.2f} s")
    return {"models": results, "protocol": protocol}


def format_protocol(result: dict) -> str:
    """The verification protocol against embedding the same set (images and flips) with each model."""
    protocol = result.get("protocol")
    if not protocol:
        return ""
    images = 2 * 2 * protocol["pairs"]  # every image and its flip
    per_model = ", ".join(
        f"{m['model']} {images / m['paths']['torch default']['images_per_s']:.0f} s" for m in result["models"]
    )
    return (f"Verification of an LFW-sized set ({protocol['pairs']:,} pairs): the 10-fold protocol "
            f"(accuracy and VAL@FAR thresholds) takes {protocol['seconds']:.2f} s, embedding its "
            f"{images:,} images and flips on the default path takes {per_model}.")


def format_table(result: dict) -> str:
    lines = [
        "| model | batch | torch fp32 img/s | torch default img/s | onnxruntime img/s | onnxruntime / torch fp32 | "
        "min cosine vs fp32 (default, onnx) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for m in result["models"]:
        p = m["paths"]
        lines.append(
            f"| {m['model']} | {m['batch']} | {p['torch fp32']['images_per_s']:.0f} | "
            f"{p['torch default']['images_per_s']:.0f} ({m['torch_default_precision']}) | "
            f"{p['onnxruntime']['images_per_s']:.0f} ({m['onnx_provider'].replace('ExecutionProvider', '')}) | "
            f"{p['onnxruntime']['images_per_s'] / p['torch fp32']['images_per_s']:.2f}x | "
            f"{p['torch default']['min_cosine_vs_torch_fp32']:.4f}, {p['onnxruntime']['min_cosine_vs_torch_fp32']:.6f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["mbf", "r18", "r50"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="mbf, batch 8, 2 batches (smoke test)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    enable_huge_pages()  # as train.py does
    if args.quick:
        args.models, args.batch_size, args.batches, args.warmup = ["mbf"], 8, 2, 1
    start = time.perf_counter()
    result = run(args.models, batch=args.batch_size, batches=args.batches, warmup=args.warmup, device=args.device)
    print(format_table(result))
    print(f"({time.perf_counter() - start:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
