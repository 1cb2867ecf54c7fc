"""Knowledge distillation through train.py: a distilled run on one process and on 2 gloo
ranks logs `| distill ...|`, evaluates the frozen teacher once and reports its accuracy
beside the student's, saves the student alone; a resumed distilled run ends with the
weights (and projection) of an uninterrupted one; another teacher on resume and bad
distillation inputs are one `error:` line, exit 2, with nothing written.

The teacher is an untrained MobileFaceNet with 64-dimensional embeddings (the student
has 128), so `cosine` trains a projection. Data: the mxnet-written MS1M-style pair from
shared/testdata with the LFW-style pairs beside it as the verification set.
"""
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import SHARED_TESTDATA, copy_ms1m_style
from helpers import PYTHON, REPO_ROOT, run_script

DIM, TEACHER_DIM = 128, 64
COMMON = [
    "--device=cpu", "--network=mbf", "--num_classes=12", "--num_image=48", "--batch_size=4", "--frequent=1",
    "--num_workers=0", f"--embedding_size={DIM}", "--lr=0.05", "--warmup_epoch=0", "--precision=fp32",
    "--num_epoch=1",
]
TORCHRUN = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
PROGRESS = re.compile(r"step (\d+)/\d+ \([^)]*\) \| epoch \d+ \| loss ([0-9.]+) \| distill ([0-9.]+) \| lr ")


@pytest.fixture(scope="module")
def rec(tmp_path_factory):
    folder = copy_ms1m_style(tmp_path_factory.mktemp("rec"))
    shutil.copy(SHARED_TESTDATA / "lfw_style.bin", folder / "lfw_style.bin")
    return folder


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """An mbf teacher's weights (64-d embeddings), as train.py writes model.pt."""
    from backbones import get_model

    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("teacher") / "model.pt"
    torch.save(get_model("mbf", num_features=TEACHER_DIM).state_dict(), path)
    return path


def _distill(teacher, loss="cosine", weight=2.0):
    return [f"--teacher={teacher}", "--teacher_network=mbf", f"--distill_weight={weight}", f"--distill_loss={loss}"]


def _args(rec, output, *extra):
    return ["configs/ms1mv3_r50", f"--rec={rec}", f"--output={output}", *COMMON, *extra]


def _train_in_process(rec, output, *extra) -> int:
    """train.main in this process, with one thread as the subprocesses (OMP_NUM_THREADS=1):
    on a loaded 2-core machine more threads than cores cost several times the time."""
    import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train.main(_args(rec, output, *extra))
    finally:
        torch.set_num_threads(threads)
        for handler in logging.getLogger("arcface").handlers:
            handler.close()  # the training.log of this run


def _torchrun(rec, output, *extra):
    return run_script([*TORCHRUN, REPO_ROOT / "train.py", *_args(rec, output, *extra)], timeout=400)


def _progress(output) -> dict[int, tuple[float, float]]:
    log = (Path(output) / "training.log").read_text()
    return {int(s): (float(loss), float(d)) for s, loss, d in PROGRESS.findall(log)}


def _rank_state(output, step, rank=0):
    path = Path(output) / "checkpoints" / f"step_{step:09d}" / f"checkpoint_gpu_{rank}.pt"
    return torch.load(path, map_location="cpu", weights_only=False)


def _teacher_accuracy(teacher, rec) -> float:
    """The teacher's flip accuracy on the verification set, computed here."""
    from backbones.weights import load_backbone_weights
    from dataset.verification_bin import load_bin
    from eval.verification import embed_verification_set, evaluate

    data_list, issame = load_bin(str(rec / "lfw_style.bin"))
    embeddings, _ = embed_verification_set(data_list, load_backbone_weights(teacher, "mbf"), batch_size=4)
    return evaluate(embeddings, issame, nrof_folds=10).accuracy


def test_single_process_distilled_run_logs_distill_and_the_teachers_accuracy(rec, teacher, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from backbones import get_model

    out = tmp_path / "run"
    assert _train_in_process(rec, out, *_distill(teacher), "--max_steps=3", "--val_targets=['lfw_style']",
                             "--verbose=2") == 0
    progress = _progress(out)
    assert sorted(progress) == [1, 2, 3] and all(0 < d <= 2 * 2.0 for _, d in progress.values()), progress

    log = (out / "training.log").read_text()
    summary = [line for line in log.splitlines() if "[lfw_style] verification accuracy after 3 steps" in line]
    assert len(summary) == 1, log[-2000:]
    teacher_acc = _teacher_accuracy(teacher, rec)
    assert f"; teacher (mbf) {100 * teacher_acc:.2f}% (student " in summary[0], summary[0]

    # model.pt is the student alone; the checkpoint holds the projection and the teacher's identity
    student = get_model("mbf", num_features=DIM)
    student.load_state_dict(torch.load(out / "model.pt", weights_only=True), strict=True)
    aux = _rank_state(out, 3)["state_dict_aux"]["distill"]
    assert aux["projection.weight"].shape == (TEACHER_DIM, DIM)
    assert aux["_extra_state"]["teacher"] == str(teacher) and len(aux["_extra_state"]["teacher_sha256"]) == 64

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    distill = {e.step: e.value for e in events.Scalars("Train/distill")}
    assert distill == pytest.approx({step: d for step, (_, d) in progress.items()}, abs=1e-4)
    teacher_events = events.Scalars("Acc/val-Acc2 lfw_style teacher")  # evaluated once, at the end
    assert [(e.step, round(e.value, 6)) for e in teacher_events] == [(3, round(teacher_acc, 6))]
    assert [e.step for e in events.Scalars("Acc/val-Acc2 lfw_style")] == [2, 3]


@pytest.fixture(scope="module")
def two_rank_run(rec, teacher, tmp_path_factory):
    """2 gloo ranks, the whole epoch (6 steps of 8), checkpoint sets at steps 3 and 6."""
    out = tmp_path_factory.mktemp("two") / "full"
    _torchrun(rec, out, *_distill(teacher), "--save_every_steps=3", "--keep_checkpoints=3", "--val_targets=[]")
    return out


def _resume_copy(run, step, where) -> Path:
    """A fresh output folder holding only the run's checkpoint set of `step`: a run interrupted there."""
    name = f"step_{step:09d}"
    shutil.copytree(Path(run) / "checkpoints" / name, where / "checkpoints" / name)
    return where


def test_two_rank_distilled_run_resumed_from_its_middle_ends_like_the_uninterrupted_one(
        rec, teacher, two_rank_run, tmp_path):
    full = two_rank_run
    assert sorted(_progress(full)) == [1, 2, 3, 4, 5, 6]
    assert "world size 2 (gloo" in (full / "training.log").read_text()

    cut = _resume_copy(full, 3, tmp_path / "cut")
    _torchrun(rec, cut, *_distill(teacher), "--save_every_steps=3", "--val_targets=[]", "--resume=True")
    assert "resumed from" in (cut / "training.log").read_text() and sorted(_progress(cut)) == [4, 5, 6]
    assert _progress(cut) == {step: value for step, value in _progress(full).items() if step > 3}

    a, b = torch.load(full / "model.pt", weights_only=True), torch.load(cut / "model.pt", weights_only=True)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert a.keys() == b.keys() and not different, different[:5]
    def projection(run, step, rank):
        return _rank_state(run, step, rank)["state_dict_aux"]["distill"]["projection.weight"]

    for rank in (0, 1):
        assert torch.equal(projection(full, 6, rank), projection(cut, 6, rank))
    # one projection: rank 0's initial weights on every rank, the same averaged gradients; trained
    assert torch.equal(projection(full, 6, 0), projection(full, 6, 1))
    assert not torch.equal(projection(full, 3, 0), projection(full, 6, 0))


def test_resuming_with_another_teacher_is_one_line_and_changes_nothing(rec, two_rank_run, tmp_path, capsys):
    from backbones import get_model

    other = tmp_path / "other_teacher.pt"
    torch.manual_seed(8)
    torch.save(get_model("mbf", num_features=TEACHER_DIM).state_dict(), other)
    cut = _resume_copy(two_rank_run, 3, tmp_path / "cut")
    before = {p: p.stat().st_mtime_ns for p in cut.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert _train_in_process(rec, cut, *_distill(other), "--val_targets=[]", "--resume=True") == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    expected = f"error: teacher={str(other)!r} is not the teacher this run was trained with"
    assert len(lines) == 1 and lines[0].startswith(expected), lines
    assert "pass the run's teacher to resume it" in lines[0]
    assert before == {p: p.stat().st_mtime_ns for p in cut.rglob("*") if p.is_file()}


@pytest.mark.parametrize("overrides, message", [
    (["--teacher={missing}", "--teacher_network=mbf", "--distill_weight=1"], "teacher='{missing}': file not found"),
    (["--teacher={teacher}", "--teacher_network=r50", "--distill_weight=1"],
     "teacher='{teacher}' (teacher_network='r50'): the weights do not fit network 'r50'"),
    (["--teacher={teacher}", "--teacher_network=mbf", "--distill_weight=1", "--distill_loss=cos"],
     "distill_loss must be one of 'cosine', 'mse', 'relation', got 'cos'; did you mean 'cosine'?"),
    (["--teacher={teacher}", "--teacher_network=mbf", "--distill_weight=-0.5"],
     "distill_weight must be a finite number >= 0 (0 turns distillation off), got -0.5"),
], ids=["missing_teacher", "mbf_weights_as_r50", "unknown_distill_loss", "negative_weight"])
def test_bad_distillation_input_is_one_error_line_and_writes_nothing(
        rec, teacher, tmp_path, capsys, overrides, message):
    names = {"missing": tmp_path / "nope.pt", "teacher": teacher}
    out = tmp_path / "never"
    capsys.readouterr()
    assert _train_in_process(rec, out, *[o.format(**names) for o in overrides], "--val_targets=[]") == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message.format(**names) in lines[0], lines
    assert not out.exists()
