"""tools/subcenter_noise.py on the mxnet-written MS1M-style set (12 identities x 4 images) and a
sub-centre checkpoint saved by 2 ranks: the listed samples, their angles and dominant
sub-centres against an independent computation; bad input is one error line."""
from __future__ import annotations

import csv
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, copy_ms1m_style
from helpers import PYTHON, run_script
from losses.reshard import split
from utils import checkpoint as ckpt

K, EMB, CLASSES = 3, 16, 12
TOOL = ROOT / "tools" / "subcenter_noise.py"


def _embed_all(model, data):
    from dataset import open_dataset

    dataset = open_dataset(data, train=False, num_classes=CLASSES)
    with torch.no_grad():
        images = torch.stack([dataset[i][0] for i in range(len(dataset))])
        labels = torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])
        return F.normalize(model.eval()(images)), labels


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(output folder of a 2-rank set, data folder, embeddings, labels, centres)."""
    from backbones import get_model

    tmp = tmp_path_factory.mktemp("subcenter")
    data = copy_ms1m_style(tmp / "data")
    torch.manual_seed(0)
    model = get_model("mbf", num_features=EMB, dropout=0.0, fp16=False)
    embeddings, labels = _embed_all(model, data)
    # Sub-centres built from the samples: even classes have their first three photos around
    # sub-centre 0 and the fourth on sub-centre 1; odd classes the other way round.
    centres = torch.randn(CLASSES, K, EMB, generator=torch.Generator().manual_seed(1))
    for c in range(CLASSES):
        own = embeddings[labels == c]
        main, odd_one = (0, 1) if c % 2 == 0 else (1, 0)
        centres[c, main] = own[:3].mean(dim=0)
        centres[c, odd_one] = own[3]
    centres = centres.reshape(CLASSES * K, EMB)
    full = {
        "epoch": 0, "batch_in_epoch": 1, "global_step": 1, "world_size": 1, "rank": 0,
        "state_dict_backbone": model.state_dict(), "state_dict_softmax_fc": {"weight": centres},
        "partial_fc": {"class_start": 0, "num_local": CLASSES, "num_classes": CLASSES, "embedding_size": EMB,
                       "num_subcenters": K, "loss": "arcface"},
        "run": {"network": "mbf", "embedding_size": EMB, "num_classes": CLASSES},
    }
    out = tmp / "run"
    ckpt.write_set(out, 1, split(full, 2))
    return out, data, embeddings, labels, centres, full


def _expected(embeddings, labels, centres):
    """Nearest sub-centre, each class's most frequent one, angles to it, written out plainly."""
    cos = torch.einsum("nd,nkd->nk", embeddings, F.normalize(centres).view(CLASSES, K, EMB)[labels])
    nearest = cos.argmax(dim=1)
    dominant = {}
    for c in range(CLASSES):
        votes = [int((nearest[labels == c] == j).sum()) for j in range(K)]
        dominant[c] = votes.index(max(votes))
    to_dominant = [float(cos[i, dominant[int(labels[i])]]) for i in range(len(labels))]
    angles = [math.degrees(math.acos(max(-1.0, min(1.0, c)))) for c in to_dominant]
    return angles, dominant, nearest


def test_lists_the_samples_far_from_their_dominant_subcentre(trained, tmp_path):
    out, data, embeddings, labels, centres, _ = trained
    angles, dominant, nearest = _expected(embeddings, labels, centres)
    assert set(dominant.values()) == {0, 1}, "both layouts occur"
    threshold = sorted(angles)[len(angles) // 2]  # about half the samples beyond it
    csv_path = tmp_path / "noisy.csv"
    proc = run_script([PYTHON, TOOL, out, data, csv_path, "--max-angle", str(threshold), "--num-workers", "0",
                       "--device", "cpu"])
    rows = list(csv.DictReader(csv_path.open()))
    listed = [i for i, a in sorted(enumerate(angles), key=lambda t: -t[1]) if a > threshold]
    assert [int(r["index"]) for r in rows] == listed and 0 < len(listed) < len(angles)
    for r in rows:
        i = int(r["index"])
        assert int(r["label"]) == int(labels[i])
        assert float(r["angle_deg"]) == pytest.approx(angles[i], abs=2e-3)
        assert int(r["dominant_subcentre"]) == dominant[int(labels[i])]
        assert int(r["nearest_subcentre"]) == int(nearest[i])
        assert "train.rec" in r["where"]
    assert f"{len(listed)} of {len(angles)} samples" in proc.stdout


def test_all_writes_every_sample(trained, tmp_path):
    out, data, *_ = trained
    assert _tool().main([str(out), str(data), str(tmp_path / "all.csv"), "--all", "--num-workers", "0",
                                 "--device", "cpu"]) == 0
    assert len(list(csv.DictReader((tmp_path / "all.csv").open()))) == 4 * CLASSES


def _tool():
    if str(ROOT / "tools") not in sys.path:
        sys.path.insert(0, str(ROOT / "tools"))
    import subcenter_noise

    return subcenter_noise


@pytest.mark.parametrize("problem, message", [
    ("one_centre", "trained with one centre per class (num_subcenters=1)"),
    ("fewer_classes", "label 10 >= num_classes=10"),
    ("rank_file", "is one rank's file of a 2-rank set; pass the set's folder"),
    ("max_angle", "--max-angle must be in [0, 180] degrees, got 200.0"),
])
def test_bad_input_is_a_user_error_and_writes_nothing(trained, tmp_path, problem, message):
    from _cli import UserError

    out, data, _, _, centres, full = trained
    path, extra = out, []
    if problem in ("one_centre", "fewer_classes"):
        if problem == "one_centre":
            state = dict(full, partial_fc={**full["partial_fc"], "num_subcenters": 1, "num_classes": CLASSES * K})
        else:
            state = dict(full, partial_fc={**full["partial_fc"], "num_classes": 10},
                         state_dict_softmax_fc={"weight": centres[: 10 * K]})
        path = tmp_path / "merged.pt"
        torch.save(state, path)
    elif problem == "rank_file":
        (cset,), _ = ckpt.list_sets(out)
        path = cset.rank_file(1)
    else:
        extra = ["--max-angle", "200"]
    target = tmp_path / "out.csv"
    with pytest.raises(UserError) as exc:
        _tool().main([str(path), str(data), str(target), "--num-workers", "0", "--device", "cpu", *extra])
    assert message in str(exc.value) and "\n" not in str(exc.value)
    assert not target.exists()


def test_a_missing_checkpoint_is_one_error_line(tmp_path):
    proc = run_script([PYTHON, TOOL, tmp_path / "nowhere", tmp_path, tmp_path / "out.csv"], check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [f"error: checkpoint not found: {tmp_path / 'nowhere'}"]
