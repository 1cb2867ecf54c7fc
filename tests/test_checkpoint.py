"""Checkpoint sets: atomic files, manifests written last, pruning, fallback, 2-rank agreement."""
import json
import os
from pathlib import Path

import pytest
import torch

from helpers import run_distributed
from utils import checkpoint as ckpt
from utils.distributed import DistContext

CTX = DistContext()


def _state(step, rank=0):
    return {"epoch": 0, "batch_in_epoch": step, "global_step": step, "rank": rank, "w": torch.full((3,), float(step))}


def test_atomic_save_leaves_no_partial_file_on_failure(tmp_path):
    target = tmp_path / "x.pt"
    ckpt.atomic_save({"a": torch.ones(2)}, target)

    class Unpicklable:
        def __reduce__(self):
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        ckpt.atomic_save({"a": Unpicklable()}, target)
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


def test_failed_save_keeps_the_previous_set(tmp_path, monkeypatch):
    ckpt.save_set(tmp_path, 10, _state(10), CTX)

    def disk_full(obj, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "atomic_save", disk_full)
    with pytest.raises(ckpt.CheckpointError, match="No space left on device"):
        ckpt.save_set(tmp_path, 20, _state(20), CTX)
    complete, incomplete = ckpt.list_sets(tmp_path)
    assert [s.step for s in complete] == [10] and incomplete == []


def test_mirror_exposes_insightface_layout(tmp_path):
    ckpt.save_set(tmp_path, 10, _state(10), CTX, mirror_top_level=True)
    ckpt.save_set(tmp_path, 20, _state(20), CTX, mirror_top_level=True, keep=1)
    top = torch.load(tmp_path / "checkpoint_gpu_0.pt", weights_only=True)
    assert top["global_step"] == 20
    assert ckpt.has_checkpoints(tmp_path)


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
    if ctx.rank == fail_rank:
        os.environ["CKPT_FAIL"] = "1"
    ckpt.save_set(folder, 5, _state(5, ctx.rank), ctx)
    try:
        original = ckpt.atomic_save

        def maybe_fail(obj, path):
            if os.environ.get("CKPT_FAIL"):
                raise OSError(28, "No space left on device")
            return original(obj, path)

        ckpt.atomic_save = maybe_fail
        ckpt.save_set(folder, 6, _state(6, ctx.rank), ctx)
        outcome = "saved"
    except ckpt.CheckpointError as exc:
        outcome = str(exc)
    finally:
        ckpt.atomic_save = original
    state, cset = ckpt.load_newest(folder, ctx)
    return outcome, cset.step, int(state["rank"])


def test_two_ranks_agree_and_a_failure_on_one_rank_voids_the_set(tmp_path):
    results = run_distributed(_two_rank_save, 2, str(tmp_path), 1)
    assert results[0][0].startswith("another rank failed") and "No space left" in results[1][0]
    assert [r[1:] for r in results] == [(5, 0), (5, 1)]
    complete, incomplete = ckpt.list_sets(tmp_path)
    assert [s.step for s in complete] == [5] and incomplete == []
