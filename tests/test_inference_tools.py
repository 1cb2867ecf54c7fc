"""Embedder loading (.pt / .onnx) and the CLIs pack_bin, eval_verification and inference."""
from __future__ import annotations

import pickle

import cv2
import numpy as np
import pytest
import torch

from backbones import get_model
from backbones.weights import WeightsError
from conftest import SHARED_TESTDATA
from helpers import PYTHON, REPO_ROOT, run_script, run_script_on_terminal
from eval.embedder import EmbedderError, load_embedder
from eval.face_align import ARCFACE_TEMPLATE
from eval.onnx_export import export_onnx
from dataset.verification_bin import load_bin, write_bin
from utils.errors import EXIT_USER_ERROR

TOOLS = REPO_ROOT / "tools"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two cores shared with other test runs
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The same small backbone (mbf) as a state_dict and as ONNX."""
    torch.manual_seed(0)
    net = get_model("mbf", dropout=0.0, fp16=False, num_features=512).eval()
    root = tmp_path_factory.mktemp("models")
    torch.save(net.state_dict(), root / "mbf.pt")
    export_onnx(net, root / "mbf.onnx")
    return root / "mbf.pt", root / "mbf.onnx"


@pytest.fixture(scope="module")
def small_bin(tmp_path_factory):
    """The first 10 pairs of the Python-2 test set (one per fold), rewritten with write_bin."""
    with open(SHARED_TESTDATA / "lfw_style.bin", "rb") as f:
        bins, issame = pickle.load(f, encoding="bytes")
    path = tmp_path_factory.mktemp("bins") / "lfw_small.bin"
    write_bin(str(path), bins[:20], issame[:10])
    return path


def _faces(n=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, 112, 112), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# Embedder


def test_state_dict_and_onnx_embed_alike(models):
    pt, onnx_path = models
    faces = _faces()
    a = load_embedder(str(pt), network="mbf").embed(faces)
    b = load_embedder(str(onnx_path)).embed(faces)
    assert a.shape == b.shape == (3, 512) and a.dtype == np.float32
    # A freshly initialised mbf has tiny outputs (norm ~1e-5): compare directions and norms.
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    np.testing.assert_allclose(na, nb, rtol=1e-3)
    np.testing.assert_allclose(np.sum(a * b, axis=1) / (na * nb), 1.0, atol=1e-5)


def test_training_checkpoint_with_ddp_prefixes_loads(models, tmp_path):
    pt, _ = models
    weights = torch.load(pt, weights_only=True)
    wrapped = {"epoch": 3, "state_dict_backbone": {f"module.{k}": v for k, v in weights.items()}}
    torch.save(wrapped, tmp_path / "checkpoint_gpu_0.pt")
    loaded = load_embedder(str(tmp_path / "checkpoint_gpu_0.pt"), network="mbf").model.state_dict()
    assert loaded.keys() == weights.keys()
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)


def test_weights_of_another_network_are_refused_by_name(models):
    pt, _ = models
    with pytest.raises(WeightsError) as err:
        load_embedder(str(pt), network="r18")
    message = str(err.value)
    assert str(pt) in message and "'r18'" in message and "missing" in message


@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")  # chosen: no onnxscript
def test_onnx_with_the_wrong_input_is_refused(tmp_path):
    path = tmp_path / "wide.onnx"
    net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten()).eval()
    torch.onnx.export(net, torch.zeros(1, 3, 96, 96), str(path), dynamo=False, input_names=["data"], opset_version=17)
    with pytest.raises(EmbedderError, match=r"\[1, 3, 96, 96\].*\[N, 3, 112, 112\]"):
        load_embedder(str(path))


@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")  # chosen: no onnxscript
def test_fixed_batch_onnx_is_run_in_padded_chunks(tmp_path):
    path = tmp_path / "fixed.onnx"
    net = torch.nn.Sequential(torch.nn.AvgPool2d(28), torch.nn.Flatten()).eval()
    torch.onnx.export(net, torch.zeros(2, 3, 112, 112), str(path), dynamo=False, input_names=["data"], opset_version=17)
    faces = _faces(3)
    got = load_embedder(str(path)).embed(faces)
    want = net((torch.from_numpy(faces).float() / 255 - 0.5) / 0.5).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_state_dict_needs_a_network(models):
    with pytest.raises(EmbedderError, match="--network"):
        load_embedder(str(models[0]))


# ---------------------------------------------------------------------------------------------
# pack_bin


def test_pack_bin_keeps_jpeg_bytes_and_encodes_other_formats(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "faces"
    (folder / "p1").mkdir(parents=True)
    pixels = {}
    for name in ("p1/a.jpg", "p1/b.png", "c.bmp"):
        img = rng.integers(0, 256, size=(112, 112, 3), dtype=np.uint8)
        cv2.imwrite(str(folder / name), img)
        pixels[name] = img
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("# comment\np1/a.jpg p1/b.png 1\n\nc.bmp p1/a.jpg 0\n")
    out = tmp_path / "set.bin"
    run_script([PYTHON, TOOLS / "pack_bin.py", folder, pairs, out])

    with open(out, "rb") as f:
        bins, issame = pickle.load(f, encoding="bytes")
    assert issame == [True, False] and len(bins) == 4
    assert bins[0] == bins[3] == (folder / "p1/a.jpg").read_bytes()
    for i, name in ((1, "p1/b.png"), (2, "c.bmp")):
        assert bins[i].startswith(b"\x89PNG")
        assert np.array_equal(cv2.imdecode(np.frombuffer(bins[i], np.uint8), cv2.IMREAD_COLOR), pixels[name])
    (images, _), loaded = load_bin(str(out))
    assert loaded == [True, False] and images.shape == (4, 3, 112, 112)


@pytest.mark.parametrize(
    "pairs_text, expected",
    [
        ("a.jpg a.jpg 1\na.jpg missing.jpg 0\n", "image not found: {folder}/missing.jpg"),
        ("a.jpg a.jpg 1\na.jpg a.jpg 1\na.jpg a.jpg yes\n", "{pairs}:3: expected 'relpath1 relpath2 1|0'"),
    ],
)
def test_pack_bin_errors_name_the_file_or_line(tmp_path, pairs_text, expected):
    folder = tmp_path / "faces"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.jpg"), np.zeros((112, 112, 3), np.uint8))
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(pairs_text)
    out = tmp_path / "out.bin"
    proc = run_script([PYTHON, TOOLS / "pack_bin.py", folder, pairs, out], check=False)
    assert proc.returncode == EXIT_USER_ERROR and "Traceback" not in proc.stderr
    assert expected.format(folder=folder, pairs=pairs) in proc.stderr
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# eval_verification and inference CLIs


def _table_row(stdout, name):
    return next(line.split() for line in stdout.splitlines() if line.startswith(name))


def test_eval_verification_gives_the_same_accuracy_for_pt_and_onnx(models, small_bin):
    pt, onnx_path = models
    rows = {}
    for model, extra in ((pt, ["--network", "mbf"]), (onnx_path, [])):
        args = [PYTHON, TOOLS / "eval_verification.py", model, "--bins", small_bin, "--batch-size", "8", *extra]
        if model == pt:  # at a terminal: a progress bar with the count, rate and time left
            proc = run_script_on_terminal(args, env={"CI": ""})
            assert "lfw_small: embedding" in proc.stderr and "20/20" in proc.stderr and "img/s" in proc.stderr
        else:  # captured (not a terminal): no bar, nothing but the table
            proc = run_script(args)
            assert "embedding" not in proc.stderr and "\r" not in proc.stderr
        rows[model.suffix] = _table_row(proc.stdout, "lfw_small")
    pt_row, onnx_row = rows[".pt"], rows[".onnx"]
    assert pt_row[1] == "10"  # pairs
    assert pt_row[2:5] == onnx_row[2:5]  # accuracy +- std
    assert float(pt_row[5]) == pytest.approx(float(onnx_row[5]), rel=1e-3)  # XNorm


def test_eval_verification_missing_bin_is_one_line(models, tmp_path):
    proc = run_script(
        [PYTHON, TOOLS / "eval_verification.py", models[1], "--bins", tmp_path / "nope.bin"], check=False
    )
    assert proc.returncode == EXIT_USER_ERROR and "Traceback" not in proc.stderr
    assert f"verification set not found: {tmp_path / 'nope.bin'}" in proc.stderr


def _cosine(stdout):
    line = next(line for line in stdout.splitlines() if line.startswith("cosine similarity:"))
    return float(line.split(":")[1])


def test_inference_cli_pt_and_onnx_agree(models, tmp_path):
    pt, onnx_path = models
    rng = np.random.default_rng(3)
    a, b = tmp_path / "a.jpg", tmp_path / "b.png"
    cv2.imwrite(str(a), rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))
    cv2.imwrite(str(b), rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))
    from_pt = run_script([PYTHON, TOOLS / "inference.py", "--network", "mbf", "--weight", pt, "--img", a, b])
    from_onnx = run_script([PYTHON, TOOLS / "inference.py", "--weight", onnx_path, "--img", a, b])
    assert "embedding shape (512,)" in from_pt.stdout
    assert abs(_cosine(from_pt.stdout) - _cosine(from_onnx.stdout)) < 1e-4

    # The printed embedding is the normalised one of the model's output.
    want = load_embedder(str(pt), network="mbf").embed(cv2.imread(str(a))[:, :, ::-1].transpose(2, 0, 1)[None].copy())[0]
    want /= np.linalg.norm(want)
    text = from_pt.stdout.split("\n", 1)[1].split(str(b))[0]
    printed = np.array([float(v) for v in text.replace("[", " ").replace("]", " ").split()])
    np.testing.assert_allclose(printed, want, atol=2e-6)


def test_inference_cli_aligns_with_landmarks_and_warns_on_resize(models, tmp_path):
    _, onnx_path = models
    rng = np.random.default_rng(4)
    aligned = cv2.resize(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), (112, 112), interpolation=cv2.INTER_CUBIC)
    cv2.imwrite(str(tmp_path / "aligned.png"), aligned)
    # The same face, twice as large and shifted, in a bigger photo.
    forward = np.array([[2.0, 0.0, 40.0], [0.0, 2.0, 30.0]])
    cv2.imwrite(str(tmp_path / "photo.png"), cv2.warpAffine(aligned, forward, (320, 300)))
    landmarks = (ARCFACE_TEMPLATE * 2 + [40.0, 30.0]).ravel()
    identity = ARCFACE_TEMPLATE.ravel()

    proc = run_script(
        [PYTHON, TOOLS / "inference.py", "--weight", onnx_path, "--img", tmp_path / "aligned.png", tmp_path / "photo.png",
         "--align", *identity, *landmarks]
    )
    assert _cosine(proc.stdout) > 0.99  # the photo aligned back to the same face
    assert "warning" not in proc.stderr

    proc = run_script([PYTHON, TOOLS / "inference.py", "--weight", onnx_path, "--img", tmp_path / "photo.png"])
    assert "warning" in proc.stderr and "320x300" in proc.stderr

    proc = run_script(
        [PYTHON, TOOLS / "inference.py", "--weight", onnx_path, "--img", tmp_path / "photo.png", "--align", "1", "2"],
        check=False,
    )
    assert proc.returncode == EXIT_USER_ERROR and "10 numbers per image" in proc.stderr and "Traceback" not in proc.stderr


def test_inference_cli_embeds_a_folder_into_one_file(models, tmp_path):
    pt, _ = models
    rng = np.random.default_rng(5)
    folder = tmp_path / "faces"
    names = ["p1/a.jpg", "p1/b.png", "p2/c.bmp", "top.png", "p2/deep/d.jpg"]
    pixels = {}
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        pixels[name] = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
        cv2.imwrite(str(folder / name), pixels[name])
    cv2.imwrite(str(folder / "p2" / "wide.png"), rng.integers(0, 256, (100, 140, 3), dtype=np.uint8))
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden").mkdir()
    cv2.imwrite(str(folder / ".hidden" / "x.png"), pixels["top.png"])
    out = tmp_path / "faces.npz"
    args = [PYTHON, TOOLS / "inference.py", "--network", "mbf", "--weight", pt, "--folder", folder, "--output", out,
            "--batch-size", "2", "--workers", "2"]
    proc = run_script_on_terminal(args, env={"CI": ""})
    assert "embedding" in proc.stderr and "6/6" in proc.stderr  # the bar, at a terminal
    assert "1 of 6 images were not 112x112" in proc.stderr and "p2/wide.png" in proc.stderr

    saved = np.load(out)
    assert saved["names"].tolist() == sorted(names + ["p2/wide.png"])
    embeddings, norms = saved["embeddings"], saved["norms"]
    assert embeddings.shape == (6, 512) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    # Each row is its own image's embedding (names and rows stay together across batches).
    embedder = load_embedder(str(pt), network="mbf")
    for row, name in enumerate(saved["names"]):
        if name in pixels:
            decoded = cv2.imread(str(folder / name))  # JPEG is lossy: what the file holds
            want = embedder.embed(decoded[:, :, ::-1].transpose(2, 0, 1)[None].copy())[0]
            np.testing.assert_allclose(norms[row], np.linalg.norm(want), rtol=1e-4)
            np.testing.assert_allclose(embeddings[row], want / np.linalg.norm(want), atol=2e-5)

    bad = run_script([*args[:-6], "--folder", tmp_path / "none", "--output", out], check=False)
    assert bad.returncode == EXIT_USER_ERROR and bad.stderr.strip() == f"error: image folder not found: {tmp_path / 'none'}"
