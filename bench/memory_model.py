"""The memory model of the PartialFC head: what one rank holds, on paper and measured.

A rank holds the float32 class centres of its shard and their optimizer state for the
whole run (the *persistent* part, bytes per class), and during a step the *sampled
working set*: the normalised copy of the sampled centres, the [global batch x sampled]
logits and their gradients, the sampled centres' gradient and the optimizer's pieces.
`head_peak` is the persistent part plus the largest phase of a step; each phase lists
what is alive at its peak, read from losses/partial_fc.py (_CosineLogits,
_ShardedSoftmaxCrossEntropy), losses/margin.py and losses/optim.py.

    python bench/memory_model.py --validate [--full]  # predicted vs measured peaks, each case in a fresh process
    python bench/memory_model.py --table              # the largest number of identities on 8 and 64 GPUs

Measured the way bench/bench_partial_fc.py measures (bench.common.PeakMemory): on a CPU
the resident-set high-water mark above the process's state before the head is built,
which adds what the process allocates on its first step whatever the head's size (thread
pools, kernel caches): the `process` term, measured on a tiny head in the same run. On
CUDA torch.cuda.max_memory_allocated, tensors only.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from losses.optim import ROUNDING_TABLE_SIZE  # noqa: E402
from losses.row_chunks import (  # noqa: E402
    ACCELERATOR_CHUNK_BYTES, CPU_CHUNK_BYTES, LEAN_ACCELERATOR_CHUNK_BYTES, LEAN_CPU_CHUNK_BYTES,
)

GiB = 2**30
CHUNK_ROWS = 256  # the logits_chunk_rows of the capacity table's chunked columns
STATE_BYTES = {"float32": 4, "bfloat16": 2}


@dataclass(frozen=True)
class Head:
    num_local: int  # class centres on this rank
    sample_rate: float
    global_batch: int  # embeddings all ranks gather: batch per rank x world size
    embedding_size: int = 512
    matmul_bytes: int = 2  # the logits' matmul: 2 (fp16/bf16 autocast), 4 (fp32)
    optimizer: str = "sgd"  # or "adamw"
    fc_state_dtype: str = "float32"
    device: str = "cuda"
    # PartialFC's logits_chunk_rows: rows of the global batch whose logits are alive at once
    # (losses/chunked_logits.py); 0 (or >= the global batch): all of them.
    logits_chunk_rows: int = 0

    @property
    def sampled(self) -> int:
        """Rows used per step (PartialFC.num_sample; the batch's positives are assumed fewer)."""
        return self.num_local if self.sample_rate >= 1.0 else max(1, int(self.sample_rate * self.num_local))

    @property
    def chunked(self) -> bool:
        return 0 < self.logits_chunk_rows < self.global_batch

    @property
    def deferred(self) -> bool:
        """The sampled rows' gradient kept as factors until the optimizer step (losses.optim
        asks for it for bfloat16 state; the chunked head materialises it)."""
        return self.fc_state_dtype != "float32" and self.sample_rate < 1.0 and not self.chunked

    @property
    def lean_chunk_rows(self) -> int:
        budget = LEAN_CPU_CHUNK_BYTES if self.device == "cpu" else LEAN_ACCELERATOR_CHUNK_BYTES
        return max(1, budget // (self.embedding_size * 4))

    @property
    def chunk_rows(self) -> int:
        """Rows of one piece of losses.row_chunks: the gather/normalise loop and the optimizer."""
        budget = CPU_CHUNK_BYTES if self.device == "cpu" else ACCELERATOR_CHUNK_BYTES
        return max(1, budget // (self.embedding_size * 4))


def persistent_bytes_per_class(optimizer: str, fc_state_dtype: str, embedding_size: int, sampling: bool) -> int:
    """Bytes per class centre held for the whole run: the float32 centre and its optimizer state.

    SGD: momentum (D values); AdamW: two moments (2 D values) and, with sampling, a float32
    step count per row. The values are 4 bytes each, or 2 with fc_state_dtype="bfloat16".
    """
    state = STATE_BYTES[fc_state_dtype] * embedding_size
    if optimizer == "sgd":
        return 4 * embedding_size + state
    return 4 * embedding_size + 2 * state + (4 if sampling else 0)


def persistent_bytes(h: Head) -> int:
    per_class = persistent_bytes_per_class(h.optimizer, h.fc_state_dtype, h.embedding_size, h.sample_rate < 1.0)
    table = 4 * ROUNDING_TABLE_SIZE if h.fc_state_dtype != "float32" else 0  # the random bits
    return h.num_local * per_class + table


def step_phases(h: Head) -> dict[str, int]:
    """Bytes above the persistent part at the peak of each phase of a step."""
    C, k, N, D, d = h.num_local, h.sampled, h.global_batch, h.embedding_size, h.matmul_bytes
    low = d < 4
    piece = min(k, h.chunk_rows) * D  # elements of one piece
    centres_n = k * D * d  # normalised sampled centres, in the matmul dtype (saved for backward)
    # The matmul's own output is kept for the backward in low precision when N < D.
    kept_cosines = N * k * d if low and N < D else 0
    embeddings = h.global_batch * D * (4 + 4 + d)  # gathered, normalised, cast
    phases = {}
    if h.sample_rate < 1.0:
        # PartialFC.sample: a random score per class, a mask, top-k values and indices, the index.
        phases["sample"] = embeddings + 5 * C + 20 * k
    if h.deferred:
        phases.update(_deferred_phases(h, embeddings))
        return phases
    if h.chunked:
        phases.update(_chunked_phases(h, embeddings, centres_n, piece))
        return phases
    # Gathering and normalising piece by piece: one float32 piece beside the result.
    phases["normalise"] = embeddings + centres_n + 4 * piece
    # After the matmul: the cosines, and their float32 copy that the margin and softmax use.
    phases["logits"] = embeddings + centres_n + N * k * (d + 4 if low else 4)
    # Backward through the margin (logits.mul_(s)): autograd makes a new float32 gradient
    # beside the softmax buffer that _ShardedSoftmaxCrossEntropy's backward returned.
    phases["margin backward"] = embeddings + centres_n + kept_cosines + 8 * N * k
    # _CosineLogits.backward: the logits' float32 gradient, its copy in the matmul dtype (for the
    # embeddings' gradient) and its column-scaled copy, the float32 gradient of the sampled
    # centres, and one piece's matmul result.
    phases["centre gradient"] = (
        embeddings + centres_n + kept_cosines + N * k * (4 + 2 * d if low else 8) + 4 * k * D
        + (piece * d if low else 0)
    )
    phases["optimizer"] = 4 * k * D + _optimizer_piece_bytes(h, piece)
    return phases


def _deferred_phases(h: Head, embeddings: int) -> dict[str, int]:
    """The phases when the sampled rows' gradient is kept as factors (losses.row_gradient:
    bfloat16 state with sampling): no normalised copy of all sampled centres, no [k x D]
    gradient; every piece is a lean one."""
    k, N, D, d = h.sampled, h.global_batch, h.embedding_size, h.matmul_bytes
    low = d < 4
    piece = min(k, h.lean_chunk_rows) * D
    kept_cosines = N * k * d if low and N < D else 0
    cosines = N * k * d if low else 0  # the matmul's output before its float32 copy
    return {
        # Piece by piece: gathered float32 rows and their normalised copy, into the cosines.
        "normalise": embeddings + N * k * d + piece * (4 + d),
        "logits": embeddings + cosines + 4 * N * k,
        # The softmax buffer and the new gradient of `logits.mul_(s)`.
        "margin backward": embeddings + kept_cosines + 8 * N * k,
        # The logits' float32 gradient and its column-scaled copy S (the factor); the
        # embeddings' gradient from one piece of gathered rows (float32 and cast).
        "centre gradient": embeddings + kept_cosines + N * k * (4 + d) + piece * (4 + d),
        # S and the embeddings stay until the step; per piece: the gathered rows, their
        # normalised copy, the materialised gradient (matmul output and float32), the
        # widened state and its stored copy.
        "optimizer": N * k * d + N * D * d + _optimizer_piece_bytes(h, piece) + piece * (4 + 2 * d),
    }


def _chunked_phases(h: Head, embeddings: int, centres_n: int, piece: int) -> dict[str, int]:
    """The phases of the head that computes the loss and both gradients a block of
    `logits_chunk_rows` rows at a time in its forward (losses/chunked_logits.py): the
    gradients of the embeddings (float32 [N x D]) and of the sampled centres (float32
    [k x D]) are kept from the first block to the optimizer step; no [N x k] matrix exists."""
    k, N, D, d = h.sampled, h.global_batch, h.embedding_size, h.matmul_bytes
    c, low = h.logits_chunk_rows, d < 4
    lean = min(k, h.lean_chunk_rows) * D  # elements of a lean piece
    kept = embeddings + 4 * N * D + centres_n + 4 * k * D
    return {
        "normalise": embeddings + centres_n + 4 * piece,
        # One block at the end of its backward (autograd inside the forward): the matmul's
        # output (the leaf), its float32 working copy (margin, softmax and then the logits'
        # gradient, in place; a float32 leaf is cloned), the new gradients of `logits.mul_(s)`
        # and of the target's `index_put_`, and the leaf's gradient.
        "block": kept + c * k * (2 * d + 12),
        # The block's share of the centres' gradient: leaf, its gradient (scaled in place) and,
        # in low precision, per lean piece the matmul's result and its float32 widening for the
        # sum (a float32 matmul accumulates into the sum itself).
        "centre gradient": kept + c * k * 2 * d + (lean * (d + 4) if low else 0),
        # The projection of the summed gradient, per lean piece: the widened centres.
        "projection": kept + 4 * lean,
        "optimizer": 4 * k * D + _optimizer_piece_bytes(h, piece),
    }


def _optimizer_piece_bytes(h: Head, piece: int) -> int:
    """Temporaries of one piece of the row update (losses.optim)."""
    if h.fc_state_dtype == "float32":
        if h.sample_rate >= 1.0 and h.optimizer == "sgd":
            return 0  # a dense gradient: torch's fused SGD, in place
        rows = piece
    else:  # lean pieces; on an accelerator at most the rounding table's size
        rows = min(piece, h.lean_chunk_rows * h.embedding_size)
        if h.device != "cpu":
            rows = min(rows, max(1, ROUNDING_TABLE_SIZE // h.embedding_size) * h.embedding_size)
    state = STATE_BYTES[h.fc_state_dtype]
    if h.optimizer == "sgd":  # the weights' and the momentum's copies (widened to float32)
        per_element = 4 + 4 + (state if state != 4 else 0)
    else:  # weights, both moments (widened), the bias-corrected quotients
        per_element = 4 + 2 * 4 + 2 * 4 + (2 * state if state != 4 else 0)
    extra = 8 * h.num_local if h.sample_rate >= 1.0 else 0  # the dense gradient's row index
    return per_element * rows + extra


def head_peak(h: Head) -> tuple[int, str]:
    """(bytes, the phase that sets the peak)."""
    phases = step_phases(h)
    phase = max(phases, key=phases.get)
    return persistent_bytes(h) + phases[phase], phase


def reference_peak(h: Head) -> int:
    """insightface's dense way (bench_partial_fc's reference): float32 centres in a full Parameter,
    `weight[index]` (a dense [C x D] gradient), torch's SGD over the whole shard. The peak is its
    optimizer step: centres, momentum, gradient and the gradient-plus-weight-decay copy."""
    C, k, N, D, d = h.num_local, h.sampled, h.global_batch, h.embedding_size, h.matmul_bytes
    backward = 4 * C * D + k * D * (4 + 4 + d) + 12 * N * k  # gradient beside gathered, normalised, cast rows
    return 8 * C * D + max(8 * C * D, backward)


# --- measuring -----------------------------------------------------------------------------

def _measure_case(case: dict) -> int | None:
    """One case in this (fresh) process: the peak of `steps` steps above the state before the head."""
    import torch

    from bench.bench_partial_fc import EMBEDDING, _build
    from bench.common import PeakMemory
    from losses import CombinedMarginLoss, PartialFC
    from losses.optim import build_optimizer

    device = torch.device(case["device"])
    low = {2: torch.bfloat16 if device.type == "cpu" else torch.float16, 4: None}[case["matmul_bytes"]]
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    batch = case["global_batch"]
    inputs = [(torch.randn(batch, EMBEDDING, generator=g), torch.randint(0, case["num_local"], (batch,), generator=g))
              for _ in range(case["steps"])]
    inputs = [(e.to(device), lab.to(device)) for e, lab in inputs]
    with PeakMemory(device) as memory:
        if case["impl"] == "reference":
            step, keep = _build("reference", case["num_local"], case["sample_rate"], low, device)
        else:
            head = PartialFC(CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), EMBEDDING, case["num_local"],
                             case["sample_rate"], matmul_dtype=low, check_labels=False,
                             logits_chunk_rows=case.get("logits_chunk_rows", 0)).to(device)
            optimizer = build_optimizer(case["optimizer"], [], head.parameters(), lr=0.1, weight_decay=5e-4,
                                        device_type=device.type, fc_state_dtype=case["fc_state_dtype"])
            keep = (head, optimizer)

            def step(embeddings, labels):
                loss = head(embeddings, labels)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                return loss

        for embeddings, labels in inputs:
            step(embeddings.clone().requires_grad_(), labels)
        peak = memory.peak_bytes()
    del keep
    return peak


# glibc serves blocks below its mmap threshold (which rises to 32 MiB as large blocks are
# freed) from its heap and keeps them resident after free: the resident-set peak then holds
# freed pieces besides the live tensors. With a fixed threshold every block of 64 KiB or
# more is returned when freed, and the peak is that of the live tensors (as CUDA's
# max_memory_allocated reports them), plus the process's own.
EXACT_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}


def measure(case: dict, env: dict | None = None) -> int:
    """The case's peak, measured in a fresh process (as bench_partial_fc does on a CPU)."""
    import os

    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", json.dumps(case)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"case {case} failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"]


def validation_cases(full: bool, device: str) -> list[tuple[str, dict]]:
    base = dict(impl="ours", num_local=300_000, sample_rate=0.1, global_batch=128, embedding_size=512,
                matmul_bytes=2, optimizer="sgd", fc_state_dtype="float32", device=device, steps=3)
    cases = [
        ("SGD, float32 state", {}),
        ("SGD, bfloat16 state", dict(fc_state_dtype="bfloat16")),
        ("AdamW, float32 state", dict(optimizer="adamw")),
        ("AdamW, bfloat16 state", dict(optimizer="adamw", fc_state_dtype="bfloat16")),
        ("SGD, bfloat16 state, no sampling", dict(sample_rate=1.0, fc_state_dtype="bfloat16")),
        ("SGD, batch 2048 (logits dominate)", dict(num_local=100_000, sample_rate=0.3, global_batch=2048)),
        ("the same, logits_chunk_rows=256", dict(num_local=100_000, sample_rate=0.3, global_batch=2048,
                                                 logits_chunk_rows=256)),
        ("the same, bfloat16 state", dict(num_local=100_000, sample_rate=0.3, global_batch=2048,
                                          logits_chunk_rows=256, fc_state_dtype="bfloat16")),
        ("SGD, fp32 matmul, batch 512", dict(matmul_bytes=4, global_batch=512)),
        ("reference (dense, insightface)", dict(impl="reference")),
    ]
    if full:  # the benchmark's headline case
        big = dict(num_local=1_000_000, sample_rate=0.1)
        cases += [
            ("1M classes, SGD, float32 state", big),
            ("1M classes, SGD, bfloat16 state", dict(big, fc_state_dtype="bfloat16")),
            ("1M classes, reference", dict(big, impl="reference")),
        ]
    return [(name, {**base, **change}) for name, change in cases]


def predicted(case: dict) -> tuple[int, str]:
    h = Head(**{k: case[k] for k in Head.__dataclass_fields__ if k in case})
    if case["impl"] == "reference":
        return reference_peak(h), "optimizer"
    return head_peak(h)


def validate(full: bool, device: str, log=print) -> list[dict]:
    """Each case's measured peak against the model.

    On a CPU each case is measured twice, each time in a fresh process: with glibc's default
    allocator (what bench_partial_fc reports) and with EXACT_ALLOCATOR, against which the model
    is checked; the measurement adds the `process` term there, taken from the same case with a
    2000-class head (its measured peak minus its model).
    """
    import torch

    rows = []
    for name, case in validation_cases(full, device):
        model, phase = predicted(case)
        row = {"case": name, **case, "model_bytes": model, "phase": phase}
        if device == "cpu":
            tiny = dict(case, num_local=2000)
            row["process_bytes"] = measure(tiny, EXACT_ALLOCATOR) - predicted(tiny)[0]
            row["measured_bytes"] = measure(case, EXACT_ALLOCATOR)
            row["measured_default_allocator_bytes"] = measure(case)
        else:
            torch.cuda.empty_cache()
            row["process_bytes"] = 0
            row["measured_bytes"] = row["measured_default_allocator_bytes"] = measure(case)
        row["predicted_bytes"] = model + row["process_bytes"]
        row["error"] = row["predicted_bytes"] / row["measured_bytes"] - 1
        rows.append(row)
        log(f"  {name:<36} predicted {row['predicted_bytes'] / GiB:6.3f} GiB  "
            f"measured {row['measured_bytes'] / GiB:6.3f} GiB ({100 * row['error']:+.1f}%; "
            f"default allocator {row['measured_default_allocator_bytes'] / GiB:.3f})  peak: {phase}")
    return rows


def format_validation(rows: list[dict]) -> str:
    lines = [
        "| case | classes | rate | batch | matmul | predicted GiB | measured GiB | error | default allocator GiB "
        "| peak phase |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['num_local']:,} | {r['sample_rate']} | {r['global_batch']} | "
            f"{'16-bit' if r['matmul_bytes'] == 2 else 'fp32'} | {r['predicted_bytes'] / GiB:.3f} | "
            f"{r['measured_bytes'] / GiB:.3f} | {100 * r['error']:+.1f}% | "
            f"{r['measured_default_allocator_bytes'] / GiB:.3f} | {r['phase']} |"
        )
    return "\n".join(lines)


# --- capacity --------------------------------------------------------------------------------

# What torch reports as the total memory of these GPUs (bytes), e.g. an RTX 4090 / A10-class
# 24 GB card, A100 40 GB, A100 / H100 80 GB, H200 141 GB.
GPU_BYTES = {"24 GB": int(23.6 * GiB), "40 GB": int(39.4 * GiB), "80 GB": int(79.1 * GiB), "141 GB": int(139.7 * GiB)}


@dataclass(frozen=True)
class Allowance:
    """What a rank needs besides the head (bytes): an r100 backbone at batch 128 per GPU."""
    params: int = 65_156_160  # iresnet100, 512-d embedding
    # float32 weights, gradients, momentum and DDP's gradient buckets
    param_bytes_each: int = 16
    # Saved activations per 112x112 sample under 16-bit autocast, measured (torch.autograd.graph
    # saved_tensors_hooks on backbones.get_model("r100")): 103.1 MiB in 16 bits + 24.9 MiB float32.
    activation_bytes_per_sample: int = 134_202_432
    batch: int = 128
    # CUDA context, cuDNN/cuBLAS workspaces, NCCL buffers, the caching allocator's slack.
    runtime_bytes: int = 2 * GiB

    def total(self) -> int:
        return self.params * self.param_bytes_each + self.activation_bytes_per_sample * self.batch + self.runtime_bytes


def max_identities(gpus: int, gpu_bytes: int, *, sample_rate=0.1, optimizer="sgd", fc_state_dtype="float32",
                   allowance: Allowance = Allowance(), embedding_size=512, logits_chunk_rows=0) -> int:
    """The most classes (all ranks together) whose head fits next to the allowance on every rank."""
    budget = gpu_bytes - allowance.total()

    def fits(num_local: int) -> bool:
        h = Head(num_local, sample_rate, allowance.batch * gpus, embedding_size, 2, optimizer, fc_state_dtype, "cuda",
                 logits_chunk_rows)
        return head_peak(h)[0] <= budget

    if budget <= 0 or not fits(1):
        return 0
    lo, hi = 1, 1
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * gpus


def largest_sample_rate(identities: int, gpus: int, gpu_bytes: int, **kw) -> float:
    """The largest sample rate (to 1e-4) at which `identities` fit, 0.0 if none does."""
    lo, hi = 0.0, 1.0
    if max_identities(gpus, gpu_bytes, sample_rate=1e-4, **kw) < identities:
        return 0.0
    for _ in range(14):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if max_identities(gpus, gpu_bytes, sample_rate=mid, **kw) >= identities else (lo, mid)
    return lo


def capacity_table(sample_rate: float = 0.1, logits_chunk_rows: int = 0) -> str:
    combos = [("sgd", "float32"), ("sgd", "bfloat16"), ("adamw", "float32"), ("adamw", "bfloat16")]
    lines = [
        "| GPUs | GPU | " + " | ".join(f"{o.upper() if o == 'sgd' else 'AdamW'} {s}" for o, s in combos) + " |",
        "| ---: | --- | " + " | ".join("---:" for _ in combos) + " |",
    ]
    for gpus in (8, 64):
        for name, size in GPU_BYTES.items():
            cells = [max_identities(gpus, size, sample_rate=sample_rate, optimizer=o, fc_state_dtype=s,
                                    logits_chunk_rows=logits_chunk_rows) for o, s in combos]
            lines.append(f"| {gpus} | {name} | " + " | ".join(_millions(c) for c in cells) + " |")
    return "\n".join(lines)


def _millions(n: int) -> str:
    return "-" if n == 0 else f"{n / 1e6:,.0f}M" if n >= 10e6 else f"{n / 1e6:,.1f}M"


def goals() -> list[str]:
    a = Allowance()
    lines = [f"allowance per GPU (r100, batch 128): {a.total() / GiB:.1f} GiB"]
    for gpus, size, target in ((8, "80 GB", 100e6), (64, "80 GB", 1e9)):
        for dtype in ("float32", "bfloat16"):
            got = max_identities(gpus, GPU_BYTES[size], fc_state_dtype=dtype)
            rate = largest_sample_rate(int(target), gpus, GPU_BYTES[size], fc_state_dtype=dtype)
            lines.append(f"{gpus} x {size}, SGD {dtype} state, rate 0.1: {got / 1e6:,.0f}M identities "
                         f"(goal {target / 1e6:,.0f}M: {'holds' if got >= target else 'misses'}); "
                         f"{target / 1e6:,.0f}M fit up to sample rate {rate:.4f}")
    for dtype in ("float32", "bfloat16"):
        chunked = max_identities(64, GPU_BYTES["80 GB"], fc_state_dtype=dtype, logits_chunk_rows=CHUNK_ROWS)
        lines.append(f"64 x 80 GB, SGD {dtype} state, rate 0.1, logits_chunk_rows={CHUNK_ROWS}: "
                     f"{chunked / 1e6:,.0f}M identities (goal 1,000M: {'holds' if chunked >= 1e9 else 'misses'})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--validate", action="store_true", help="predicted vs measured peaks")
    parser.add_argument("--full", action="store_true", help="with --validate: also the 1M-class cases (~9 GiB)")
    parser.add_argument("--table", action="store_true", help="the largest number of identities per GPU setup")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="write the validation rows here")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        from utils.host_memory import enable_huge_pages

        enable_huge_pages()  # as bench_partial_fc and train.py do
        print(json.dumps({"peak_bytes": _measure_case(json.loads(args.case))}))
        return
    if args.validate:
        rows = validate(args.full, args.device)
        print(format_validation(rows))
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.table or not args.validate:
        print(capacity_table())
        print(f"\nwith logits_chunk_rows={CHUNK_ROWS}:")
        print(capacity_table(logits_chunk_rows=CHUNK_ROWS))
        print("\n".join(goals()))


if __name__ == "__main__":
    main()
