"""Re-sharding checkpoints across world sizes: class centres and their optimizer rows move
together, and a re-sharded optimizer continues exactly like the unsharded one."""
import copy

import pytest
import torch

from losses import CombinedMarginLoss, PartialFC
from losses.partial_fc import shard_range
from utils import checkpoint as ckpt
from utils.distributed import DistContext
from losses.optim import build_optimizer
from losses.reshard import load_for_rank, merge, reshard, split, translate_position

NUM_CLASSES, DIM = 11, 4


def _model(rank=0, world_size=1):
    torch.manual_seed(0)
    backbone = torch.nn.Linear(3, DIM)
    head = PartialFC(CombinedMarginLoss(64, 1.0, 0.5, 0.0), DIM, NUM_CLASSES, 0.5, rank=rank, world_size=world_size)
    return backbone, head


def _step(backbone, head, optimizer, step, rows):
    """One optimizer step with a fixed backbone gradient and sparse gradient rows (global class ids)."""
    g = torch.Generator().manual_seed(100 + step)
    for p in backbone.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    grad_rows = torch.randn(len(rows), DIM, generator=g)
    local = [(i, r - head.class_start) for i, r in enumerate(rows) if 0 <= r - head.class_start < head.num_local]
    index = torch.tensor([[r for _, r in local]], dtype=torch.int64).reshape(1, -1)
    values = grad_rows[[i for i, _ in local]] if local else torch.zeros(0, DIM)
    head.weight.grad = torch.sparse_coo_tensor(index, values, head.weight.shape, check_invariants=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


STEPS = [[0, 3, 5, 9], [1, 3, 6, 10], [2, 5, 7, 8]]


def _trained_state(optimizer_name):
    """A world-size-1 rank state after two steps, laid out as train.py saves it."""
    backbone, head = _model()
    optimizer = build_optimizer(optimizer_name, backbone.parameters(), head.parameters(), lr=0.1, weight_decay=0.01)
    for step, rows in enumerate(STEPS[:2]):
        _step(backbone, head, optimizer, step, rows)
    state = {
        "epoch": 0, "batch_in_epoch": 2, "global_step": 2, "world_size": 1, "rank": 0,
        "state_dict_backbone": backbone.state_dict(), "state_dict_softmax_fc": head.state_dict(),
        "partial_fc": {"class_start": 0, "num_local": NUM_CLASSES, "num_classes": NUM_CLASSES, "embedding_size": DIM},
        "state_optimizer": optimizer.state_dict(), "rng": {"torch": torch.get_rng_state()},
        "run": {"network": "linear", "embedding_size": DIM, "num_classes": NUM_CLASSES, "global_batch_size": 8},
    }
    # A copy: state_dict() shares storage with the live tensors that the tests step further.
    return copy.deepcopy(state), (backbone, head, optimizer)


def _head_state(state):
    return state["state_optimizer"]["state"][len(state["state_optimizer"]["param_groups"][0]["params"])]


@pytest.mark.parametrize("optimizer_name, row_keys", [("sgd", ["momentum_buffer"]), ("adamw", ["exp_avg", "exp_avg_sq", "row_step"])])
def test_centres_and_optimizer_rows_move_together(optimizer_name, row_keys):
    full, _ = _trained_state(optimizer_name)
    full_head = _head_state(full)
    two = split(full, 2)
    three_via_two = [reshard(dict(enumerate(two)), 2, rank, 3) for rank in range(3)]
    for rank, state in enumerate(three_via_two):
        start, count = shard_range(NUM_CLASSES, rank, 3)
        assert state["partial_fc"]["class_start"] == start and state["partial_fc"]["num_local"] == count
        assert torch.equal(state["state_dict_softmax_fc"]["weight"], full["state_dict_softmax_fc"]["weight"][start:start + count])
        head = _head_state(state)
        for key in row_keys:
            assert torch.equal(head[key], full_head[key][start:start + count]), key
        assert ("state_dict_backbone" in state) == (rank == 0) and "rng" not in state
    merged = merge(three_via_two)
    assert torch.equal(merged["state_dict_softmax_fc"]["weight"], full["state_dict_softmax_fc"]["weight"])
    for key in row_keys:
        assert torch.equal(_head_state(merged)[key], full_head[key])
    # the backbone's optimizer state is rank 0's, unchanged
    for index, value in full["state_optimizer"]["state"].items():
        if index != len(full["state_optimizer"]["param_groups"][0]["params"]):
            for key in value:
                assert torch.equal(torch.as_tensor(merged["state_optimizer"]["state"][index][key]), torch.as_tensor(value[key]))


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_resharded_optimizer_continues_like_the_unsharded_one(optimizer_name):
    full, (backbone, head, optimizer) = _trained_state(optimizer_name)
    _step(backbone, head, optimizer, 2, STEPS[2])  # the reference: one more step on one rank
    for rank, state in enumerate(split(full, 3)):
        state = copy.deepcopy(state)  # each rank is its own process in a run: nothing shared
        b, h = _model(rank, 3)
        b.load_state_dict(full["state_dict_backbone"])
        h.load_state_dict(state["state_dict_softmax_fc"])
        opt = build_optimizer(optimizer_name, b.parameters(), h.parameters(), lr=0.1, weight_decay=0.01)
        opt.load_state_dict(state["state_optimizer"])  # shapes are checked against this rank's shard
        _step(b, h, opt, 2, STEPS[2])
        torch.testing.assert_close(h.weight.detach(), head.weight.detach()[h.class_start:h.class_start + h.num_local], rtol=0, atol=0)
        torch.testing.assert_close(b.weight.detach(), backbone.weight.detach(), rtol=0, atol=0)


def test_load_for_rank_reads_a_set_saved_by_another_world_size(tmp_path):
    full, _ = _trained_state("sgd")
    ckpt.write_set(tmp_path, 2, split(full, 2))
    (cset,), _ = ckpt.list_sets(tmp_path)
    states = [load_for_rank(cset, DistContext(rank=r, world_size=3)) for r in range(3)]
    assert torch.equal(merge(states)["state_dict_softmax_fc"]["weight"], full["state_dict_softmax_fc"]["weight"])
    assert all(s["resharded_from_world_size"] == 2 and s["world_size"] == 3 for s in states)
    same = load_for_rank(cset, DistContext(rank=1, world_size=2))  # same world size: the file as saved
    assert same["partial_fc"]["class_start"] == shard_range(NUM_CLASSES, 1, 2)[0] and "resharded_from_world_size" not in same

    # a corrupt file needed by a rank is a CheckpointError (load_newest then falls back)
    path = cset.rank_file(1)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        load_for_rank(cset, DistContext(rank=2, world_size=3))


def test_insightface_rank_files_without_metadata_are_resharded(tmp_path):
    full, _ = _trained_state("sgd")
    for rank, state in enumerate(split(full, 2)):  # insightface's keys only, in the output folder
        keep = {k: state[k] for k in ("epoch", "global_step", "state_dict_softmax_fc", "state_optimizer", "state_lr_scheduler") if k in state}
        if rank == 0:
            keep["state_dict_backbone"] = state["state_dict_backbone"]
        torch.save(keep, tmp_path / f"checkpoint_gpu_{rank}.pt")
    cset = ckpt.legacy_set(tmp_path)
    state = load_for_rank(cset, DistContext(rank=0, world_size=1))
    assert torch.equal(state["state_dict_softmax_fc"]["weight"], full["state_dict_softmax_fc"]["weight"])


def test_shards_that_do_not_add_up_are_refused():
    full, _ = _trained_state("sgd")
    two = split(full, 2)
    two[1]["state_dict_softmax_fc"]["weight"] = two[1]["state_dict_softmax_fc"]["weight"][:-1]
    with pytest.raises(ckpt.CheckpointError, match="expected 6..10 for rank 1 of 2 with 11 classes"):
        merge(two)


@pytest.mark.parametrize(
    "saved, new, expected",
    [
        # (epoch, batch, saved global batch) -> new global batch, acc, steps/epoch -> (epoch, batch, step)
        ((0, 3, 8), (4, 1, 12), (0, 6, 6)),    # 2 ranks -> 1: same 24 samples consumed
        ((0, 6, 4), (12, 1, 4), (0, 2, 2)),    # 1 rank -> 3
        ((0, 5, 4), (12, 1, 4), (0, 1, 1)),    # 20 samples: continue after 12, repeat 8
        ((0, 3, 8), (4, 4, 3), (0, 4, 1)),     # gradient_acc 4: whole optimizer steps only
        ((1, 3, 8), (16, 1, 1), (2, 0, 2)),    # 24 samples exceed the new epoch's one batch of 16
        ((2, 0, 8), (4, 1, 12), (2, 0, 24)),   # epoch boundary
    ],
)
def test_translate_position(saved, new, expected):
    epoch, batch, saved_batch = saved
    global_batch, acc, steps_per_epoch = new
    pos = translate_position(epoch, batch, saved_batch, global_batch, acc, steps_per_epoch)
    assert (pos.epoch, pos.batch_in_epoch, pos.schedule_step) == expected


@pytest.mark.parametrize("optimizer_name, row_keys", [("sgd", ["momentum_buffer"]), ("adamw", ["exp_avg", "exp_avg_sq", "row_step"])])
def test_subcentre_rows_and_margin_state_move_with_their_classes(optimizer_name, row_keys):
    from losses import get_margin

    k = 2
    torch.manual_seed(0)
    backbone = torch.nn.Linear(3, DIM)
    head = PartialFC(get_margin("adaface"), DIM, NUM_CLASSES, 0.5, num_subcenters=k, rank=0, world_size=1)
    head.margin_loss.batch_mean.fill_(31.5)  # state a run would have reached
    optimizer = build_optimizer(optimizer_name, backbone.parameters(), head.parameters(), lr=0.1, weight_decay=0.01)
    for step, classes in enumerate(STEPS[:2]):  # sparse gradients over the K rows of some classes
        rows = [c * k + j for c in classes for j in range(k)]
        g = torch.Generator().manual_seed(step)
        for p in backbone.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        head.weight.grad = torch.sparse_coo_tensor(torch.tensor([rows]), torch.randn(len(rows), DIM, generator=g), head.weight.shape,
                                                   check_invariants=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    full = copy.deepcopy({
        "epoch": 0, "global_step": 2, "world_size": 1, "rank": 0, "state_dict_backbone": backbone.state_dict(),
        "state_dict_softmax_fc": head.state_dict(), "partial_fc": head.shard_metadata(),
        "state_optimizer": optimizer.state_dict(),
    })
    weight = full["state_dict_softmax_fc"]["weight"]
    assert weight.shape[0] == NUM_CLASSES * k
    three = split(full, 3)
    for rank, state in enumerate(three):
        start, count = shard_range(NUM_CLASSES, rank, 3)
        assert state["partial_fc"]["num_subcenters"] == k and state["partial_fc"]["num_local"] == count
        assert torch.equal(state["state_dict_softmax_fc"]["weight"], weight[start * k:(start + count) * k])
        assert float(state["state_dict_softmax_fc"]["margin_loss.batch_mean"]) == 31.5
        for key in row_keys:
            assert torch.equal(_head_state(state)[key], _head_state(full)[key][start * k:(start + count) * k]), key
        # a rank's state loads into that rank's head (strict: the margin state is there)
        PartialFC(get_margin("adaface"), DIM, NUM_CLASSES, 0.5, num_subcenters=k, rank=rank, world_size=3).load_state_dict(
            state["state_dict_softmax_fc"])
    merged = merge(three)
    assert torch.equal(merged["state_dict_softmax_fc"]["weight"], weight)
    for key in row_keys:
        assert torch.equal(_head_state(merged)[key], _head_state(full)[key])
    # rows that are not num_local * K are refused
    three[1]["state_dict_softmax_fc"]["weight"] = three[1]["state_dict_softmax_fc"]["weight"][:-1]
    with pytest.raises(ckpt.CheckpointError, match="2 sub-centres each"):
        merge(three)
