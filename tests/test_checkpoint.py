"""Checkpoint sets: atomic files, manifests written last, pruning, fallback, 2-rank agreement.

Write failures are real: a file-size limit (RLIMIT_FSIZE) makes the kernel refuse the
write with EFBIG, in this process or in one rank of two.
"""
import contextlib
import json
import os
from pathlib import Path

import pytest
import torch

from helpers import file_size_limit, run_distributed
from utils import checkpoint as ckpt
from utils.distributed import DistContext

CTX = DistContext()


def _state(step, rank=0):
    return {"epoch": 0, "batch_in_epoch": step, "global_step": step, "rank": rank, "w": torch.full((3,), float(step))}


def test_atomic_save_leaves_no_partial_file_on_failure(tmp_path):
    target = tmp_path / "x.pt"
    ckpt.atomic_save({"a": torch.ones(2)}, target)
    with file_size_limit(4096), pytest.raises(RuntimeError):  # torch's zip writer: "unexpected pos"
        ckpt.atomic_save({"a": torch.zeros(100_000)}, target)
    assert torch.load(target, weights_only=True)["a"].tolist() == [1.0, 1.0]  # previous content intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pt"]  # no temporary left behind


def test_sets_are_complete_only_with_a_manifest_and_pruned_to_keep(tmp_path):
    for step in (10, 20, 30):
        ckpt.save_set(tmp_path, step, _state(step), CTX, keep=2)
    complete, incomplete = ckpt.list_sets(tmp_path)
    assert [s.step for s in complete] == [30, 20] and incomplete == []
    manifest = json.loads((tmp_path / "checkpoints" / "step_000000030" / "manifest.json").read_text())
    assert manifest["world_size"] == 1 and manifest["global_step"] == 30
    # a set without manifest (a crash mid-save) is ignored and cleaned up once a newer set completes
    (tmp_path / "checkpoints" / "step_000000035").mkdir()
    torch.save(_state(35), tmp_path / "checkpoints" / "step_000000035" / "checkpoint_gpu_0.pt")
    state, cset = ckpt.load_newest(tmp_path, CTX)
    assert cset.step == 30 and state["global_step"] == 30
    ckpt.save_set(tmp_path, 40, _state(40), CTX, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000000030", "step_000000040"]


def test_corrupt_newest_set_falls_back_with_a_warning(tmp_path, caplog):
    import logging

    ckpt.save_set(tmp_path, 10, _state(10), CTX, keep=3)
    ckpt.save_set(tmp_path, 20, _state(20), CTX, keep=3)
    newest = tmp_path / "checkpoints" / "step_000000020" / "checkpoint_gpu_0.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    logger = logging.getLogger("test-ckpt")
    with caplog.at_level(logging.WARNING, logger="test-ckpt"):
        state, cset = ckpt.load_newest(tmp_path, CTX, logger)
    assert cset.step == 10 and state["w"].tolist() == [10.0] * 3
    assert "step_000000020" in caplog.text and "corrupt" in caplog.text


def _top_level(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.is_file())


def _snapshot(folder):
    return {p: p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.mark.parametrize("limit, failing_file", [(512, "checkpoint_gpu_0.pt"), (200_000, "model.pt")])
def test_failed_save_keeps_the_previous_set_and_model(tmp_path, limit, failing_file):
    """The rank file (a few kB) fits under 200 kB, the 400 kB model.pt does not."""
    main = {"model.pt": {"w": torch.zeros(100_000)}}
    ckpt.save_set(tmp_path, 10, _state(10), CTX, mirror_top_level=True, main_files=main)
    before = _snapshot(tmp_path)
    with file_size_limit(limit), pytest.raises(ckpt.CheckpointError) as failed:
        ckpt.save_set(tmp_path, 20, _state(20), CTX, mirror_top_level=True, main_files={"model.pt": {"w": torch.ones(100_000)}})
    message = str(failed.value)
    assert message.startswith("checkpoint step_000000020 not written on rank 0: [Errno 27] File too large: ")
    assert message.endswith(failing_file) and "\n" not in message
    complete, incomplete = ckpt.list_sets(tmp_path)
    assert [s.step for s in complete] == [10] and incomplete == []
    assert _snapshot(tmp_path) == before  # model.pt, the mirror and set 10 untouched, no temporary left


def test_model_and_mirrors_are_replaced_with_the_set_and_stale_mirrors_removed(tmp_path):
    for rank in (1, 2):  # mirrors of an earlier run on 3 ranks
        torch.save(_state(5, rank), tmp_path / f"checkpoint_gpu_{rank}.pt")
    ckpt.save_set(tmp_path, 10, _state(10), CTX, mirror_top_level=True, main_files={"model.pt": {"w": torch.ones(2)}})
    assert _top_level(tmp_path) == ["checkpoint_gpu_0.pt", "model.pt"]
    assert torch.load(tmp_path / "checkpoint_gpu_0.pt", weights_only=True)["global_step"] == 10
    ckpt.save_set(tmp_path, 20, _state(20), CTX, mirror_top_level=True, keep=1, main_files={"model.pt": {"w": torch.full((2,), 2.0)}})
    assert torch.load(tmp_path / "checkpoint_gpu_0.pt", weights_only=True)["global_step"] == 20
    assert torch.load(tmp_path / "model.pt", weights_only=True)["w"].tolist() == [2.0, 2.0]
    assert ckpt.has_checkpoints(tmp_path) and _top_level(tmp_path) == ["checkpoint_gpu_0.pt", "model.pt"]


def test_final_files_failure_is_one_line_naming_the_file(tmp_path):
    def export(path):
        with open(path, "wb") as f:
            f.write(b"x" * 10_000)

    with file_size_limit(4096), pytest.raises(ckpt.CheckpointError) as failed:
        ckpt.save_final(tmp_path, CTX, {"model.pt": {"w": torch.ones(2)}}, exports={"model.onnx": export})
    assert str(failed.value) == f"final weights not written on rank 0: [Errno 27] File too large: {tmp_path / 'model.onnx'}"
    written = ckpt.save_final(tmp_path, CTX, {"model.pt": {"w": torch.ones(2)}}, exports={"model.onnx": export})
    assert written == [tmp_path / "model.pt", tmp_path / "model.onnx"]


def test_insightface_top_level_files_are_a_resume_candidate(tmp_path):
    torch.save({"epoch": 3, "global_step": 300, "state_dict_softmax_fc": {}}, tmp_path / "checkpoint_gpu_0.pt")
    state, cset = ckpt.load_newest(tmp_path, CTX)
    assert cset.manifest is None and state["epoch"] == 3


def test_nothing_to_resume(tmp_path):
    assert ckpt.load_newest(tmp_path, CTX) == (None, None)
    assert not ckpt.has_checkpoints(tmp_path)


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = ckpt.capture_rng_state(torch.device("cpu"))
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.restore_rng_state(state, torch.device("cpu"))
    b = (random.random(), np.random.rand(), torch.rand(1).item())
    assert a == b
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"rng-{os.getpid()}.pt"
    torch.save(state, path)
    assert torch.load(path, weights_only=True)["numpy"]["name"] == "MT19937"  # weights_only-safe
    path.unlink()


def _two_rank_save(ctx, folder, fail_rank):
    main = {"model.pt": {"w": torch.zeros(4)}} if ctx.is_main else None
    ckpt.save_set(folder, 5, _state(5, ctx.rank), ctx, mirror_top_level=True, main_files=main)
    limit = file_size_limit(4096) if ctx.rank == fail_rank else contextlib.nullcontext()
    try:
        with limit:
            big = dict(_state(6, ctx.rank), w=torch.zeros(100_000))
            ckpt.save_set(folder, 6, big, ctx, mirror_top_level=True, main_files=main)
        outcome = "saved"
    except ckpt.CheckpointError as exc:
        outcome = str(exc)
    state, cset = ckpt.load_newest(folder, ctx)
    mirror = torch.load(Path(folder) / f"checkpoint_gpu_{ctx.rank}.pt", weights_only=True)
    return outcome, cset.step, int(state["rank"]), mirror["global_step"]


@pytest.mark.parametrize("fail_rank", [0, 1])
def test_a_write_failure_on_one_rank_stops_every_rank_with_its_line(tmp_path, fail_rank):
    results = run_distributed(_two_rank_save, 2, str(tmp_path), fail_rank)
    expected = f"checkpoint step_000000006 not written on rank {fail_rank}: [Errno 27] File too large: "
    assert results[0][0] == results[1][0] and results[0][0].startswith(expected), results
    assert results[0][0].endswith(f"step_000000006/checkpoint_gpu_{fail_rank}.pt")
    assert [r[1:] for r in results] == [(5, 0, 5), (5, 1, 5)]  # set 5 and its mirrors untouched
    complete, incomplete = ckpt.list_sets(tmp_path)
    assert [s.step for s in complete] == [5] and incomplete == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def _load_with_a_fault(ctx, folder, fault):
    """Sets 5 and 6 on two ranks; then one rank's part of set 6 is unusable in the way `fault` says."""
    for step in (5, 6):
        ckpt.save_set(folder, step, _state(step, ctx.rank), ctx, keep=3)
    ctx.barrier()
    newest = Path(folder) / "checkpoints" / "step_000000006" / "checkpoint_gpu_1.pt"
    if ctx.rank == 1 and fault == "other step":  # e.g. a stale view of a shared file system
        torch.save(_state(5, 1), newest)
    if ctx.rank == 1 and fault == "missing key":
        torch.save({k: v for k, v in _state(6, 1).items() if k != "w"}, newest)
    if ctx.rank == 1 and fault == "wrong shape":
        torch.save(dict(_state(6, 1), w=torch.zeros(4)), newest)
    ctx.barrier()

    def loader(cset, ctx, map_location):
        state = ckpt.load_rank_file(cset.rank_file(ctx.rank), map_location)
        state["w"].add_(0)  # a KeyError when the file lacks it, as re-sharding meets one
        return state

    model = torch.nn.Module()
    model.register_buffer("w", torch.zeros(3))

    def fits(state, cset):  # what the training script checks before it takes a state
        model.load_state_dict({"w": state["w"]}, strict=True)

    warnings = []

    class Log:
        def warning(self, message):
            warnings.append(message)

    state, cset = ckpt.load_newest(folder, ctx, Log(), loader=loader, check=fits)
    return cset.step, int(state["global_step"]), warnings


@pytest.mark.parametrize(
    "fault, reason",
    [
        ("missing key", "step_000000006 cannot be used on rank 1: KeyError: 'w'"),
        ("other step", "are of different steps (5 to 6): they are not one set"),
        ("wrong shape", "step_000000006 cannot be used on rank 1: RuntimeError: Error(s) in loading state_dict"),
    ],
)
def test_ranks_fall_back_together_from_a_malformed_set(tmp_path, fault, reason):
    results = run_distributed(_load_with_a_fault, 2, str(tmp_path), fault)
    assert [r[:2] for r in results] == [(5, 5), (5, 5)]
    assert results[0][2] == results[1][2] and len(results[0][2]) == 1 and reason in results[0][2][0], results


def test_no_readable_set_is_an_error_not_a_fresh_start(tmp_path):
    ckpt.save_set(tmp_path, 10, _state(10), CTX)
    (tmp_path / "checkpoints" / "step_000000010" / "checkpoint_gpu_0.pt").write_bytes(b"junk")
    with pytest.raises(ckpt.CheckpointError, match=r"none of the checkpoints in .* can be read \(.*corrupt"):
        ckpt.load_newest(tmp_path, CTX)
