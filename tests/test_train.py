"""train.py end to end: torchrun with 2 gloo processes, python as 1 process, resume, SIGTERM, ONNX, bad input.

The data is the mxnet-written MS1M-style pair from shared/testdata (12 identities x 4
images) with the Python-2 LFW-style pairs beside it as a verification set.
"""
import json
import os
import shutil
import signal
import subprocess

import numpy as np
import pytest
import torch

from conftest import SHARED_TESTDATA
from helpers import PYTHON, REPO_ROOT, run_script

TORCHRUN = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
COMMON = [
    "--device=cpu", "--network=mbf", "--num_classes=12", "--num_image=48", "--batch_size=4", "--frequent=1",
    "--num_workers=0", "--embedding_size=128", "--lr=0.05",
]
# The torchrun runs below read their batches in a loader worker process, as real runs do (a
# worker ignores SIGTERM and must not hold up the checkpoint); the single-process runs need none.
WITH_WORKER = "--num_workers=1"


@pytest.fixture(scope="module")
def rec(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rec")
    for name in ("train.rec", "train.idx", "property"):
        shutil.copy(SHARED_TESTDATA / "ms1m_style" / name, folder / name)
    shutil.copy(SHARED_TESTDATA / "lfw_style.bin", folder / "lfw_style.bin")
    return folder


def _train(launcher, rec, output, *extra, check=True):
    args = [*launcher, str(REPO_ROOT / "train.py"), "configs/ms1mv3_r50", f"--rec={rec}", f"--output={output}", *COMMON, *extra]
    return run_script(args, check=check, timeout=300)


def _load_model(path, num_features=128):
    from backbones import get_model

    model = get_model("mbf", num_features=num_features)
    model.load_state_dict(torch.load(path, weights_only=True), strict=True)
    return model.eval()


def test_torchrun_two_processes_train_checkpoint_resume_and_export(rec, tmp_path):
    out = tmp_path / "run"
    proc = _train(
        TORCHRUN, rec, out, WITH_WORKER, "--num_epoch=1", "--save_every_steps=4", "--save_all_states=True",
        "--val_targets=['lfw_style']", "--verbose=3",
    )
    log = (out / "training.log").read_text()
    assert "world size 2 (gloo" in log and "samples/s" in log and "ETA" in log
    assert "[lfw_style][3]Accuracy-Flip" in log and "[lfw_style][6]Accuracy-Highest" in log
    assert "total_step 6" in log  # 48 images // (4 x 2) = 6 steps
    assert json.loads((out / "config.json").read_text())["network"] == "mbf"
    sets = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert sets == ["step_000000004", "step_000000006"]
    manifest = json.loads((out / "checkpoints" / "step_000000006" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["global_step"] == 6
    for rank in (0, 1):
        state = torch.load(out / f"checkpoint_gpu_{rank}.pt", weights_only=True)  # insightface's place
        assert state["global_step"] == 6 and state["epoch"] == 1 and state["batch_in_epoch"] == 0
        assert state["partial_fc"]["num_local"] == 6 and state["state_dict_softmax_fc"]["weight"].shape == (6, 128)
        assert ("state_dict_backbone" in state) == (rank == 0)
    assert "Traceback" not in proc.stderr

    # model.pt: a plain backbone state_dict, no "module." prefix
    model = _load_model(out / "model.pt")
    # model.onnx: input `data`, dynamic batch, same output as PyTorch
    import onnx
    import onnxruntime as ort

    graph = onnx.load(str(out / "model.onnx")).graph
    assert [i.name for i in graph.input] == ["data"] and len(graph.output) == 1
    dims = graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 112, 112]
    x = np.random.default_rng(0).uniform(-1, 1, (3, 3, 112, 112)).astype(np.float32)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(session.run(None, {"data": x})[0], expected, atol=1e-4, rtol=0)

    # a fresh run into the same folder must not overwrite it
    refused = _train(TORCHRUN, rec, out, "--num_epoch=1", check=False)
    assert refused.returncode != 0 and "already holds checkpoints" in refused.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == sets

    # resume=True continues from step 6 into a second epoch
    _train(TORCHRUN, rec, out, WITH_WORKER, "--num_epoch=2", "--save_every_steps=4", "--resume=True", "--val_targets=[]")
    log = (out / "training.log").read_text()
    assert "resumed from" in log and "global step 6" in log
    assert "step 12/12 (100.0%)" in log
    assert (out / "checkpoints" / "step_000000012" / "manifest.json").exists()


def test_python_single_process_run(rec, tmp_path):
    out = tmp_path / "single"
    # Blocks of 5 rows of the batch of 8 (losses/chunked_logits.py): the key reaches the head.
    _train([PYTHON], rec, out, "--num_epoch=1", "--batch_size=8", "--val_targets=[]", "--logits_chunk_rows=5")
    log = (out / "training.log").read_text()
    assert "world size 1 (single process" in log and "step 6/6" in log
    assert json.loads((out / "config.json").read_text())["logits_chunk_rows"] == 5
    assert "logits_chunk_rows=5" in log  # the head's own description
    _load_model(out / "model.pt")
    assert (out / "model.onnx").stat().st_size > 0


def _final_weights(path):
    return torch.load(path, weights_only=True)


def test_interrupted_and_resumed_run_ends_with_identical_weights(rec, tmp_path):
    """SIGTERM to torchrun mid-run -> every rank checkpoints and exits; resuming gives the same model."""
    extra = [WITH_WORKER, "--num_epoch=2", "--sample_rate=0.5", "--save_every_steps=0", "--val_targets=[]"]
    full = tmp_path / "full"
    _train(TORCHRUN, rec, full, *extra)

    cut = tmp_path / "cut"
    args = [*TORCHRUN, str(REPO_ROOT / "train.py"), "configs/ms1mv3_r50", f"--rec={rec}", f"--output={cut}", *COMMON, *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # wait for real progress, then pre-empt
        lines.append(line)
        if "step 2/12" in line:
            proc.send_signal(signal.SIGTERM)
            break
    lines.extend(proc.stdout)
    proc.wait(timeout=120)
    output = "".join(lines)
    assert "stopped by SIGTERM at step" in output, output[-3000:]
    stopped_at = int(output.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert 2 <= stopped_at < 12
    assert (cut / "checkpoints" / f"step_{stopped_at:09d}" / "manifest.json").exists()

    _train(TORCHRUN, rec, cut, *extra, "--resume=True")
    a, b = _final_weights(full / "model.pt"), _final_weights(cut / "model.pt")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ after resume at step {stopped_at}: {different[:5]}"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--batch_sise=4"], "unknown config key 'batch_sise'; did you mean 'batch_size'?"),
        (["--batch_size=abc"], "key 'batch_size' expects int, got 'abc'"),
        (["--network=r51"], "unknown network 'r51'; valid networks: "),
        (["--num_classes=10"], "num_classes=10 in the config but the data set"),
        (["--num_image=50"], "num_image=50 in the config disagrees with the data set"),
        (["--batch_size=64"], "error: num_image=48 gives no optimizer step per epoch with a global batch of 64 and gradient_acc=1"),
        (["--sample_rate=1.5"], "sample_rate must be in (0, 1], got 1.5"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(rec, tmp_path, extra, message):
    out = tmp_path / "never"
    proc = _train([PYTHON], rec, out, *extra, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error") and message in lines[0], proc.stderr[-2000:]
    assert not out.exists()


def test_missing_config_and_unwritable_output(rec, tmp_path):
    proc = run_script([PYTHON, REPO_ROOT / "train.py", "configs/nope"], check=False)
    assert proc.returncode == 2 and "config file not found: configs/nope" in proc.stderr
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    proc = _train([PYTHON], rec, blocker / "out", check=False)
    assert proc.returncode == 2 and "is not writable" in proc.stderr


def test_checkpoint_from_another_network_is_refused_before_writing(rec, tmp_path):
    out = tmp_path / "run"
    _train([PYTHON], rec, out, "--num_epoch=1", "--batch_size=8", "--max_steps=1", "--val_targets=[]")
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    proc = _train([PYTHON], rec, out, "--num_epoch=1", "--batch_size=8", "--resume=True", "--network=r18", check=False)
    assert proc.returncode == 2 and "was trained with network='mbf', the config has 'r18'" in proc.stderr
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert before == after


def test_more_local_ranks_than_gpus_is_a_one_line_error(rec, tmp_path):
    """torch says only 'invalid device ordinal'; we say what to change (here: no GPU, or one)."""
    import torch

    out = tmp_path / "run"
    rank = torch.cuda.device_count()  # one past the last GPU: 0 on a CPU machine
    proc = run_script([PYTHON, REPO_ROOT / "train.py", "configs/ms1mv3_r50", f"--rec={rec}", f"--output={out}",
                       "--device=cuda"], env={"LOCAL_RANK": str(rank)}, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    if rank == 0:
        assert "local rank 0 asks for CUDA, but this node has no visible CUDA device" in lines[0]
    else:
        assert f"local rank {rank} needs GPU {rank}, but this node has {rank} visible CUDA device" in lines[0]
        assert f"start at most {rank} processes per node (--nproc_per_node)" in lines[0]
    assert "--device=cpu" in lines[0]
    assert not out.exists()
