"""Knowledge distillation measured: accuracy and closeness to the teacher on held-out faces,
and what the teacher costs per step.

measure  (issue 12, item 6)
    Trains a teacher on the synthetic faces of configs/demo.py, then two students of the
    demo's size for the same step budget, one without and one with distillation, each as
    `python train.py configs/demo.py ...` (the commands are printed, so every figure can be
    reproduced by hand). Then it embeds the held-out identities (synthetic_val.bin) with
    every model.pt and reports the verification accuracy of each and the mean cosine between
    each student's and the teacher's embeddings of the same held-out images.
    The teacher has the student's embedding size, so that cosine is measured directly (no
    projection; the projection is a training device and is not in model.pt).

        python bench/distill_demo.py measure                                   # teacher: the demo (mbf)
        python bench/distill_demo.py measure --teacher-network r50 --teacher-steps 300
        python bench/distill_demo.py measure --quick                           # smoke test, 2 steps each

    Goals (issue 12): a same-architecture student distilled with `cosine` for 100 steps has a
    mean held-out cosine to the teacher >= 0.8 (near 0 without distillation); a distilled mbf
    student of an r50 teacher beats the undistilled one at the same step budget.

cost  (calls losses/distillation.py directly)
    Samples/s of a student training step (forward, PartialFC loss, backward, SGD) without and
    with the teacher's forward + the distillation loss, the two steps interleaved so that other
    load on the machine slows both alike.

        python bench/distill_demo.py cost --student mbf --teacher r100 [--batch-size 32] [--device cuda]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):
    import _repo_path  # noqa: F401  (puts the repository root on sys.path)

from bench.common import ROOT, default_precision, machine_info, resolve_device, summarize, timed  # noqa: E402

DEMO = "configs/demo.py"
PROGRESS_DISTILL = re.compile(r"\| distill [0-9.]+")


# ---- measure: train.py runs ---------------------------------------------------------------

def _train(args: list[str], log) -> None:
    command = [sys.executable, "train.py", DEMO, *args]
    log("$ " + " ".join(command))
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: train.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def _common(out: Path, name: str, steps: int | None, rec: str) -> list[str]:
    # No evaluation during the run: every model is evaluated here, on the same held-out set.
    # steps None: the config's own plan (the demo's one epoch).
    return [
        f"--output={out / name}", *([f"--max_steps={steps}"] if steps is not None else []), f"--rec={rec}",
        "--eval_at_start=False", "--verbose=1000000", "--save_every_steps=0",
    ]


def _trained_steps(run_dir: Path) -> int:
    """The length of a finished run's plan, from its log's first line of plan arithmetic."""
    found = re.search(r"\| total_step (\d+) \|", (run_dir / "training.log").read_text())
    if found is None:
        raise SystemExit(f"error: {run_dir / 'training.log'} names no total_step: not a train.py log")
    return int(found.group(1))


def _held_out(rec: str):
    from dataset.verification_bin import load_bin

    return load_bin(os.path.join(rec, "synthetic_val.bin"))


def _embed(model_path: Path, network: str, data):
    """Flip-summed, L2-normalised embeddings [2N, D] of the held-out images, and the accuracy."""
    from backbones.weights import load_backbone_weights
    from eval.verification import embed_verification_set, evaluate

    data_list, issame = data
    model = load_backbone_weights(model_path, network)
    embeddings, _ = embed_verification_set(data_list, model, batch_size=64)
    return embeddings, evaluate(embeddings, issame, nrof_folds=10).accuracy


def measure(opts, log=print) -> dict:
    out = Path(opts.output).resolve()
    rec = opts.rec
    teacher_steps, student_steps = (2, 2) if opts.quick else (opts.teacher_steps, opts.student_steps)
    size = opts.embedding_size
    teacher_args = _common(out, "teacher", teacher_steps, rec) + [
        f"--network={opts.teacher_network}", f"--embedding_size={size}", f"--seed={opts.seed}",
    ]
    if not (out / "teacher" / "model.pt").is_file():  # the teacher is trained once
        _train(teacher_args, log)
    teacher_pt = out / "teacher" / "model.pt"
    students = {"student": []}
    for weight in opts.distill_weights:
        students[f"student_distill_w{weight:g}"] = [
            f"--teacher={teacher_pt}", f"--teacher_network={opts.teacher_network}",
            f"--distill_weight={weight}", f"--distill_loss={opts.distill_loss}",
        ]
    for name, extra in students.items():
        shutil.rmtree(out / name, ignore_errors=True)  # a fresh student each time (the teacher is kept)
        # The same seed as each other (not the teacher's): the students start from the same weights.
        _train(_common(out, name, student_steps, rec) + [
            f"--network={opts.student_network}", f"--embedding_size={size}", f"--seed={opts.seed + 1}", *extra,
        ], log)
        if extra and not PROGRESS_DISTILL.search((out / name / "training.log").read_text()):
            raise SystemExit(
                f"error: {out / name / 'training.log'} logs no '| distill' value: this train.py did not "
                f"train with the distillation term"
            )

    data = _held_out(rec)
    teacher_emb, teacher_acc = _embed(teacher_pt, opts.teacher_network, data)
    rows = {"teacher": {"network": opts.teacher_network, "steps": _trained_steps(out / "teacher"), "accuracy": teacher_acc, "cosine_to_teacher": 1.0}}
    for name in students:
        emb, acc = _embed(out / name / "model.pt", opts.student_network, data)
        cosine = float((emb * teacher_emb).sum(axis=1).mean())  # both are unit vectors
        rows[name] = {"network": opts.student_network, "steps": student_steps, "accuracy": acc, "cosine_to_teacher": cosine}
    result = {"distill_loss": opts.distill_loss, "embedding_size": size, "held_out": os.path.join(rec, "synthetic_val.bin"), "models": rows}
    log(format_measure(result))
    return result


def format_measure(result: dict) -> str:
    lines = [
        f"held-out faces: {result['held_out']} | distill_loss {result['distill_loss']} | embedding {result['embedding_size']}",
        "| model | network | steps | held-out accuracy | mean cosine to the teacher |",
        "|---|---|---:|---:|---:|",
    ]
    for name, row in result["models"].items():
        lines.append(f"| {name} | {row['network']} | {row['steps']} | {100 * row['accuracy']:.2f}% | {row['cosine_to_teacher']:.3f} |")
    return "\n".join(lines)


# ---- cost: the teacher's share of a step ------------------------------------------------

def cost(opts, log=print) -> dict:
    import torch

    from backbones import get_model
    from losses import CombinedMarginLoss, PartialFC
    from losses.distillation import Distillation

    device = resolve_device(opts.device)
    precision = default_precision(device)
    torch.manual_seed(0)
    student = get_model(opts.student, num_features=512).to(device).to(memory_format=torch.channels_last).train()
    head = PartialFC(
        CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), 512, opts.num_classes, matmul_dtype=precision.autocast_dtype,
        check_labels=device.type != "cuda",
    ).to(device)
    teacher = get_model(opts.teacher, num_features=512)
    term = Distillation(teacher, "cosine", 1.0, 512, autocast_dtype=precision.autocast_dtype).to(
        device, memory_format=torch.channels_last
    )
    params = list(student.parameters()) + list(head.parameters())
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type) if precision.use_grad_scaler else None
    g = torch.Generator().manual_seed(1)
    images = torch.randn(opts.batch_size, 3, 112, 112, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, opts.num_classes, (opts.batch_size,), generator=g).to(device)
    autocast = (
        (lambda: torch.autocast(device.type, dtype=precision.autocast_dtype))
        if precision.low_precision else contextlib.nullcontext
    )

    def step(with_teacher: bool) -> None:
        with autocast():
            embeddings = student(images)
        loss = head(embeddings, labels)
        if with_teacher:
            loss = loss + term(images, embeddings, labels)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = {False: [], True: []}
    for i in range(opts.warmup + opts.steps):
        for with_teacher in (False, True):
            seconds = timed(lambda: step(with_teacher), device)
            if i >= opts.warmup:
                times[with_teacher].append(seconds)
    result = {"device": str(device), "precision": precision.name, "student": opts.student, "teacher": opts.teacher,
              "batch_size": opts.batch_size, "machine": machine_info(device)}
    for with_teacher, key in ((False, "without_teacher"), (True, "with_teacher")):
        summary = summarize(times[with_teacher])
        result[key] = {**summary, "samples_per_s": opts.batch_size / summary["min_s"]}
    result["slowdown"] = result["with_teacher"]["min_s"] / result["without_teacher"]["min_s"]
    log(
        f"{device} {precision.name} batch {opts.batch_size}: {opts.student} alone "
        f"{result['without_teacher']['samples_per_s']:.1f} samples/s, with teacher {opts.teacher} "
        f"{result['with_teacher']['samples_per_s']:.1f} samples/s ({result['slowdown']:.2f}x the step time)"
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    m = sub.add_parser("measure", help="teacher and students through train.py; held-out accuracy and cosine")
    m.add_argument("--output", default="work_dirs/distill_demo")
    m.add_argument("--rec", default="data/synthetic_faces", help="the demo's synthetic faces (drawn on the first run)")
    m.add_argument("--teacher-network", default="mbf")
    m.add_argument("--student-network", default="mbf")
    m.add_argument("--embedding-size", type=int, default=128, help="the demo's; teacher and students share it")
    m.add_argument("--teacher-steps", type=int, default=None, help="default: the demo's plan (one epoch)")
    m.add_argument("--student-steps", type=int, default=100)
    m.add_argument("--distill-weights", type=float, nargs="+", default=[1.0])
    m.add_argument("--distill-loss", default="cosine", choices=("cosine", "mse", "relation"))
    m.add_argument("--seed", type=int, default=2048)
    m.add_argument("--quick", action="store_true", help="2 steps each: checks the command lines, measures nothing")
    c = sub.add_parser("cost", help="samples/s of a student step with and without the teacher")
    c.add_argument("--student", default="mbf")
    c.add_argument("--teacher", default="r100")
    c.add_argument("--batch-size", type=int, default=32)
    c.add_argument("--num-classes", type=int, default=10_000)
    c.add_argument("--steps", type=int, default=5)
    c.add_argument("--warmup", type=int, default=2)
    c.add_argument("--device", default="auto")
    for p in (m, c):
        p.add_argument("--json", help="write the result here")
    opts = parser.parse_args(argv)
    result = measure(opts) if opts.mode == "measure" else cost(opts)
    if opts.json:
        Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
