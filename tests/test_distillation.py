"""Knowledge distillation (losses/distillation.py): the losses against independent
restatements, the projection, the relation loss over 2 gloo ranks against one process
on the global batch, the frozen teacher, what the state_dict holds, and the bad inputs."""
import math
import os

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from backbones import get_model
from backbones.weights import WeightsError, load_backbone_weights
from helpers import run_distributed
from losses.distillation import (
    Distillation, build_distillation, check_distillation, cosine_loss, mse_loss, relation_loss,
)
from utils.config import ConfigError, load_config
from utils.errors import UserError

IN_DIM = 6


def _embeddings(n, d, seed, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_(requires_grad)


# ---- the losses against restatements (float64) ------------------------------------------------

def _cos_and_norm(s, t):
    """Row-wise cos(s_i, t_i) and |s_i|, written out."""
    s_norm = s.pow(2).sum(1).sqrt()
    t_norm = t.pow(2).sum(1).sqrt()
    return (s * t).sum(1) / (s_norm * t_norm), s_norm


def test_cosine_loss_value_and_gradient_match_the_formula():
    s, t = _embeddings(7, 5, 0), _embeddings(7, 5, 1, requires_grad=False)
    loss = cosine_loss(s, t)
    loss.backward()
    cos, s_norm = _cos_and_norm(s.detach(), t)
    b = s.shape[0]
    assert torch.allclose(loss.detach(), (1 - cos).sum() / b, atol=1e-12)
    # d/ds_i (1 - cos_i)/B = -(t_i/|t_i| - cos_i s_i/|s_i|) / (|s_i| B)
    s_hat = s.detach() / s_norm[:, None]
    t_hat = t / t.pow(2).sum(1).sqrt()[:, None]
    expected = -(t_hat - cos[:, None] * s_hat) / (s_norm[:, None] * b)
    assert torch.allclose(s.grad, expected, atol=1e-12)


def test_mse_loss_is_the_squared_distance_of_unit_vectors_summed_over_d_averaged_over_b():
    s, t = _embeddings(6, 4, 2), _embeddings(6, 4, 3, requires_grad=False)
    loss = mse_loss(s, t)
    loss.backward()
    cos, s_norm = _cos_and_norm(s.detach(), t)
    b = s.shape[0]
    s_hat = s.detach() / s_norm[:, None]
    t_hat = t / t.pow(2).sum(1).sqrt()[:, None]
    squared = [sum((float(s_hat[i, k]) - float(t_hat[i, k])) ** 2 for k in range(4)) for i in range(b)]
    loss = float(loss.detach())
    assert math.isclose(loss, sum(squared) / b, rel_tol=1e-12)
    assert math.isclose(loss, 2 * float((1 - cos).mean()), rel_tol=1e-12)  # on unit vectors
    expected = -2 * (t_hat - cos[:, None] * s_hat) / (s_norm[:, None] * b)
    assert torch.allclose(s.grad, expected, atol=1e-12)


def _relation_reference(s, t):
    """Mean over ordered pairs i != j of (cos_s(i, j) - cos_t(i, j))^2, pair by pair."""
    n = s.shape[0]

    def cos(x, i, j):
        return (x[i] * x[j]).sum() / (x[i].pow(2).sum().sqrt() * x[j].pow(2).sum().sqrt())

    total = sum((cos(s, i, j) - cos(t, i, j)) ** 2 for i in range(n) for j in range(n) if i != j)
    return total / (n * (n - 1))


def test_relation_loss_matches_the_pairwise_restatement_with_other_sizes():
    s, t = _embeddings(6, 3, 4), _embeddings(6, 8, 5, requires_grad=False)  # sizes differ
    loss = relation_loss(s, t)
    loss.backward()
    s_ref = s.detach().clone().requires_grad_()
    ref = _relation_reference(s_ref, t)
    ref.backward()
    assert torch.allclose(loss.detach(), ref.detach(), atol=1e-12)
    assert torch.allclose(s.grad, s_ref.grad, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: relation_loss(x, t), (s.detach().clone().requires_grad_(),))


def test_relation_loss_is_zero_for_a_student_with_the_teachers_geometry():
    t = _embeddings(5, 4, 6, requires_grad=False)
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    rotated_and_scaled = (t @ q) * torch.arange(1, 6, dtype=torch.float64)[:, None]
    assert float(relation_loss(rotated_and_scaled, t)) < 1e-20
    assert float(relation_loss(_embeddings(5, 4, 7, requires_grad=False), t)) > 1e-3


# ---- the term: projection, precision --------------------------------------------------------

class _TinyTeacher(nn.Module):
    """Conv + BatchNorm2d + Linear + BatchNorm1d, like the real backbones' ends, on 3x8x8 images."""

    def __init__(self, size=16):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, size)
        self.features = nn.BatchNorm1d(size)

    def forward(self, x):
        return self.features(self.fc(torch.relu(self.bn(self.conv(x))).flatten(1)))


def _teacher(size=16, seed=0):
    torch.manual_seed(seed)
    teacher = _TinyTeacher(size)
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for bn in (teacher.bn, teacher.features):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return teacher


def test_projection_maps_student_to_teacher_size_without_bias_and_preserves_angles_at_start():
    term = Distillation(_teacher(16), "cosine", 1.0, student_size=8)
    assert term.teacher_size == 16
    proj = term.projection
    assert proj is not None and proj.bias is None and tuple(proj.weight.shape) == (16, 8)
    s = torch.randn(5, 8)
    projected = proj(s)
    assert torch.allclose(projected @ projected.T, s @ s.T, atol=1e-5)  # orthogonal columns: an isometry
    # the term's loss is the cosine loss of the projected student
    t = torch.randn(5, 16)
    assert torch.allclose(term.unweighted(s, t), cosine_loss(projected, t), atol=1e-6)
    # it learns: gradients reach the projection and the student
    s.requires_grad_()
    term.unweighted(s, t).backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    assert s.grad is not None and s.grad.abs().sum() > 0


@pytest.mark.parametrize("loss, student_size, has_projection", [
    ("cosine", 16, False), ("mse", 8, True), ("relation", 8, False), ("relation", 16, False),
])
def test_projection_only_where_an_elementwise_loss_meets_differing_sizes(loss, student_size, has_projection):
    term = Distillation(_teacher(16), loss, 1.0, student_size=student_size)
    assert (term.projection is not None) == has_projection


def test_forward_is_weighted_exposes_the_unweighted_value_and_computes_in_float32_under_autocast():
    teacher = _teacher(16)
    term = Distillation(teacher, "cosine", 0.25, student_size=16, autocast_dtype=torch.bfloat16)
    images = torch.randn(4, 3, 8, 8)
    assert term.teacher_embeddings(images).dtype == torch.bfloat16  # the run's precision
    student = torch.randn(4, 16, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        weighted = term(images, student, torch.zeros(4, dtype=torch.long))
    assert weighted.dtype == torch.float32 and term.last_value.dtype == torch.float32
    assert not term.last_value.requires_grad
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        t = teacher(images)
    expected = cosine_loss(student.detach().float(), t.float())
    assert torch.allclose(term.last_value, expected, atol=1e-6)
    assert torch.allclose(weighted.detach(), 0.25 * term.last_value)
    weighted.backward()
    assert student.grad is not None


# ---- the teacher stays frozen ----------------------------------------------------------------

class _Student(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, size)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def test_teacher_weights_and_batchnorm_statistics_unchanged_after_training_steps_and_parent_train():
    teacher = _teacher(16)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    parent = nn.ModuleDict({"student": _Student(8), "distill": Distillation(teacher, "mse", 1.0, student_size=8)})
    parent = parent.to(memory_format=torch.channels_last)
    teacher_params = {id(p) for p in teacher.parameters()}
    assert not teacher_params & {id(p) for p in parent.parameters()}  # the optimizer never sees them
    optimizer = torch.optim.SGD(parent.parameters(), lr=0.5, momentum=0.9)
    parent.train()
    student_before = parent["student"].bn.running_mean.clone()
    losses = []
    for step in range(4):
        images = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(step))
        images = images.contiguous(memory_format=torch.channels_last)
        loss = parent["distill"](images, parent["student"](images), None)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    after = teacher.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"teacher {key} changed"
    assert not torch.equal(parent["student"].bn.running_mean, student_before)  # the student did train
    assert parent["distill"].projection.weight.grad is not None
    assert losses[-1] < losses[0]


# ---- what checkpoints hold ------------------------------------------------------------------

def test_state_dict_holds_the_projection_and_the_teachers_identity_not_its_weights():
    teacher = _teacher(16)
    identity = {"teacher": "t.pt", "teacher_network": "tiny", "teacher_embedding_size": 16, "teacher_sha256": "ab" * 32}
    term = Distillation(teacher, "cosine", 1.0, student_size=8, identity=identity)
    state = term.state_dict()
    assert set(state) == {"projection.weight", "_extra_state"}
    assert not any(isinstance(v, torch.Tensor) for v in state["_extra_state"].values())
    assert state["_extra_state"]["teacher_sha256"] == "ab" * 32
    parent = nn.ModuleDict({"student": _Student(8), "distill": term})
    assert not [k for k in parent.state_dict() if k.startswith("distill.") and "projection" not in k and "extra" not in k]
    assert set(Distillation(teacher, "relation", 1.0, student_size=8).state_dict()) == {"_extra_state"}

    other = Distillation(_teacher(16, seed=1), "cosine", 1.0, student_size=8, identity=identity)
    other.load_state_dict(state)
    assert torch.equal(other.projection.weight, term.projection.weight)


def test_resuming_with_another_teacher_or_projection_is_refused_in_one_line():
    identity = {"teacher": "a.pt", "teacher_network": "r50", "teacher_embedding_size": 16, "teacher_sha256": "aa" * 32}
    state = Distillation(_teacher(16), "cosine", 1.0, student_size=8, identity=identity).state_dict()
    other_teacher = Distillation(
        _teacher(16), "cosine", 1.0, student_size=8, identity={**identity, "teacher": "b.pt", "teacher_sha256": "bb" * 32}
    )
    with pytest.raises(ConfigError, match=r"teacher='b.pt' is not the teacher this run was trained with.*teacher='a.pt'"):
        other_teacher.load_state_dict(state)
    no_projection = Distillation(_teacher(16), "relation", 1.0, student_size=8, identity=identity)
    with pytest.raises(ConfigError, match=r"has a projection 8 -> 16, this run \(distill_loss='relation'.*needs no projection") as info:
        no_projection.load_state_dict(state)
    assert "\n" not in str(info.value)


# ---- relation over 2 gloo ranks equals one process on the global batch ----------------------

WORLD, LOCAL = 2, 3


def _global_problem():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(WORLD * LOCAL, IN_DIM, generator=g, dtype=torch.float64)
    student = nn.Linear(IN_DIM, 5).double()
    teacher = nn.Sequential(nn.Linear(IN_DIM, 7), nn.BatchNorm1d(7)).double()
    with torch.no_grad():
        for p in list(student.parameters()) + list(teacher.parameters()):
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return x, student, teacher


def _term(teacher, loss, rank=0, world_size=1):
    torch.manual_seed(0)  # the same initial projection in every process
    return Distillation(teacher, loss, 1.0, student_size=5, rank=rank, world_size=world_size).double()


def _distributed_relation(ctx):
    x, student, teacher = _global_problem()
    rows = slice(ctx.rank * LOCAL, (ctx.rank + 1) * LOCAL)
    out = {}
    # the loss on leaf embeddings: value and the gradient that reaches this rank's embeddings
    emb = student(x[rows]).detach().requires_grad_()
    loss = relation_loss(emb, teacher.eval()(x[rows]), rank=ctx.rank, world_size=ctx.world_size)
    loss.backward()
    out["loss"], out["emb_grad"] = loss.detach(), emb.grad
    # the term on a DDP backbone, relation and cosine (with its projection)
    for kind in ("relation", "cosine"):
        model = DDP(_global_problem()[1])
        term = _term(_global_problem()[2], kind, ctx.rank, ctx.world_size)
        term(x[rows], model(x[rows]), None).backward()
        out[kind] = {
            "value": term.last_value,
            "backbone": {k.removeprefix("module."): p.grad for k, p in model.named_parameters()},
            "projection": None if term.projection is None else term.projection.weight.grad,
        }
    return out


def test_relation_loss_on_two_gloo_ranks_equals_one_process_on_the_global_batch():
    results = run_distributed(_distributed_relation, WORLD)
    x, student, teacher = _global_problem()
    emb = student(x).detach().requires_grad_()
    loss = relation_loss(emb, teacher.eval()(x))
    loss.backward()
    for rank, r in enumerate(results):
        assert torch.allclose(r["loss"], loss.detach(), atol=1e-12)
        # the head's convention: this rank's slice of the global gradient, times the world size
        assert torch.allclose(r["emb_grad"], WORLD * emb.grad[rank * LOCAL : (rank + 1) * LOCAL], atol=1e-12)

    for kind in ("relation", "cosine"):
        x, student, teacher = _global_problem()
        term = _term(teacher, kind)
        term(x, student(x), None).backward()
        reference = {k: p.grad for k, p in student.named_parameters()}
        if kind == "relation":  # the global loss on every rank
            assert all(torch.allclose(r[kind]["value"], term.last_value, atol=1e-12) for r in results)
        else:  # each rank's mean; their mean is the global one
            mean = sum(r[kind]["value"] for r in results) / WORLD
            assert torch.allclose(mean, term.last_value, atol=1e-12)
        for r in results:  # DDP's average of the backbone gradients is the global-batch gradient
            for name, grad in reference.items():
                assert torch.allclose(r[kind]["backbone"][name], grad, atol=1e-10), (kind, name)
        if kind == "cosine":  # the projection is not in DDP: the step must average it over the ranks
            mean = sum(r[kind]["projection"] for r in results) / WORLD
            assert torch.allclose(mean, term.projection.weight.grad, atol=1e-12)


# ---- building from the config, and the bad inputs --------------------------------------------

def _cfg(**overrides):
    return load_config("configs/demo.py", [f"--{k}={v!r}" if isinstance(v, str) else f"--{k}={v}" for k, v in overrides.items()])


@pytest.fixture(scope="module")
def mbf_weights(tmp_path_factory):
    """A MobileFaceNet teacher (embedding 128) saved as our model.pt and as insightface's checkpoint layout."""
    folder = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    model = get_model("mbf", num_features=128)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    plain = folder / "model.pt"
    torch.save(model.state_dict(), plain)
    wrapped = folder / "checkpoint_gpu_0.pt"
    torch.save({"state_dict_backbone": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, wrapped)
    return str(plain), str(wrapped)


def test_build_loads_the_teacher_file_on_the_device_in_the_memory_format_with_a_projection(mbf_weights):
    plain, wrapped = mbf_weights
    cfg = _cfg(teacher=plain, teacher_network="mbf", distill_weight=2.0, embedding_size=64)
    term = build_distillation(cfg, "cpu", torch.channels_last, cfg.embedding_size)
    assert term.name == "distill" and term.weight == 2.0 and term.teacher_size == 128
    assert tuple(term.projection.weight.shape) == (128, 64)
    conv = next(p for p in term.teacher.parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 112, 112).contiguous(memory_format=torch.channels_last)
    reference = load_backbone_weights(plain, "mbf").eval()
    with torch.no_grad():
        assert torch.allclose(term.teacher_embeddings(images), reference(images), atol=1e-4)
    assert term.identity["teacher_network"] == "mbf" and term.identity["teacher_embedding_size"] == 128
    # the same weights in insightface's checkpoint layout are the same teacher
    from_checkpoint = check_distillation(_cfg(teacher=wrapped, teacher_network="mbf", distill_weight=1.0))
    assert from_checkpoint.sha256 == term.identity["teacher_sha256"]


def test_distillation_off_builds_nothing_and_a_teacher_without_weight_warns(tmp_path):
    assert build_distillation(_cfg(), "cpu") is None
    warnings = []
    missing = str(tmp_path / "not_read.pt")
    assert check_distillation(_cfg(teacher=missing, teacher_network="r50"), warn=warnings.append) is None
    assert len(warnings) == 1 and f"teacher={missing!r}" in warnings[0] and "distill_weight is 0" in warnings[0]


@pytest.mark.parametrize("overrides, error, pattern", [
    (dict(teacher="{dir}/missing.pt", teacher_network="mbf", distill_weight=1.0),
     WeightsError, r"^teacher='.*/missing\.pt': file not found$"),
    (dict(teacher="{mbf}", teacher_network="r50", distill_weight=1.0),
     WeightsError, r"^teacher='.*model\.pt' \(teacher_network='r50'\): the weights do not fit network 'r50': missing: conv1\.weight"),
    (dict(teacher="{mbf}", teacher_network="mbf", teacher_embedding_size=512, distill_weight=1.0),
     WeightsError, r"teacher_embedding_size=512\): .*shape mismatch .*\(128,\) vs \(512,\)"),
    (dict(teacher="{corrupt}", teacher_network="mbf", distill_weight=1.0),
     WeightsError, r"^teacher='.*corrupt\.pt' \(teacher_network='mbf'\): cannot be read as a PyTorch state_dict"),
    (dict(teacher="{mbf}", teacher_network="mbf", distill_weight=1.0, distill_loss="cos"),
     ConfigError, r"distill_loss must be one of 'cosine', 'mse', 'relation', got 'cos'; did you mean 'cosine'\?"),
    (dict(teacher="{mbf}", teacher_network="mbf", distill_weight=-0.5),
     ConfigError, r"distill_weight must be a finite number >= 0 .*got -0\.5"),
    (dict(distill_weight=1.0), ConfigError, r"distill_weight=1\.0 needs a teacher"),
    (dict(teacher="{mbf}", distill_weight=1.0), ConfigError, r"teacher='.*' needs teacher_network"),
    (dict(teacher="{mbf}", teacher_network="r5O", distill_weight=1.0),
     ConfigError, r"teacher_network='r5O' is not a known network \(did you mean 'r50'\?\)"),
    (dict(teacher="{mbf}", teacher_network="mbf", teacher_embedding_size=0, distill_weight=1.0),
     ConfigError, r"teacher_embedding_size must be a positive int or None .*got 0"),
])
def test_bad_input_is_one_line_naming_the_key_and_value_and_writes_nothing(mbf_weights, tmp_path, overrides, error, pattern):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a pickle" * 10)
    paths = {"dir": str(tmp_path), "mbf": mbf_weights[0], "corrupt": str(corrupt)}
    overrides = {k: v.format(**paths) if isinstance(v, str) else v for k, v in overrides.items()}
    cfg = _cfg(**overrides)
    listing = sorted(os.listdir(tmp_path))
    with pytest.raises(error, match=pattern) as info:
        build_distillation(cfg, "cpu")
    assert "\n" not in str(info.value)
    assert sorted(os.listdir(tmp_path)) == listing
    if error is WeightsError:
        assert isinstance(info.value, UserError)
