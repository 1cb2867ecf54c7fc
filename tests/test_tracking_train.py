"""Experiment tracking through train.py: an insightface config with `using_wandb=True`
trains with wandb offline and its run shows insightface's metrics, the verification
accuracy and the model artifacts; TensorBoard has the same scalars, the config and the
first batch; the wandb key is nowhere in the output folder; `wandb_resume=True` continues
the same wandb run after `--resume=True`; `using_wandb=True` without the wandb package is
one error line before anything is written.

The runs are `python train.py` subprocesses (each starts its own wandb service) on the
mxnet-written MS1M-style pair from shared/testdata (12 identities x 4 images) with the
LFW-style pairs beside it. The offline runs are read back with the readers of
tests/test_tracking.py (wandb-core's own decoder, tensorboard's EventAccumulator).
"""
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from conftest import SHARED_TESTDATA, copy_ms1m_style
from helpers import PYTHON, REPO_ROOT, run_script
from test_tracking import FAKE_KEY, tensorboard, wandb_runs

TESTS_DIR = Path(__file__).resolve().parent
TINY = ["--device=cpu", "--num_workers=0", "--precision=fp32"]

# An insightface arcface_torch experiment config (its easydict style and keys), made tiny.
INSIGHTFACE_CONFIG = """\
from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.5, 0.0)
config.network = "mbf"
config.resume = False
config.output = None
config.embedding_size = 128
config.sample_rate = 1.0
config.fp16 = False
config.momentum = 0.9
config.weight_decay = 5e-4
config.batch_size = 12
config.lr = 0.05
config.verbose = 2
config.dali = False
config.frequent = 2

config.using_wandb = True
config.wandb_key = "{key}"
config.wandb_entity = "face-lab"
config.wandb_project = "insightface-config"
config.wandb_log_all = True
config.save_artifacts = True
config.wandb_resume = False
config.suffix_run_name = "mbf"
config.notes = "tiny insightface config"

config.rec = "{rec}"
config.num_classes = 12
config.num_image = 48
config.num_epoch = 1
config.warmup_epoch = 0
config.val_targets = ["lfw_style"]
"""


@pytest.fixture(autouse=True)
def isolated_wandb(monkeypatch, tmp_path):
    """wandb offline with a private HOME, and none of the user's WANDB_* settings."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("WANDB_API_KEY", "WANDB_DATA_DIR", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_BASE_URL", "WANDB_SERVICE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def rec(tmp_path_factory):
    folder = copy_ms1m_style(tmp_path_factory.mktemp("rec"))
    shutil.copy(SHARED_TESTDATA / "lfw_style.bin", folder / "lfw_style.bin")
    return folder


def _train(config, output, *extra, check=True):
    args = [PYTHON, REPO_ROOT / "train.py", config, f"--output={output}", *TINY, *extra]
    return run_script(args, check=check, timeout=400)


def _progress_losses(output) -> dict[int, float]:
    log = (Path(output) / "training.log").read_text()
    return {int(s): float(v) for s, v in re.findall(r"step (\d+)/\d+ \([^)]*\) \| epoch \d+ \| loss ([0-9.]+)", log)}


def test_an_insightface_config_with_wandb_trains_offline_with_its_metrics_and_tensorboard_has_them_all(rec, tmp_path):
    config = tmp_path / "ms1mv3_mbf_insightface.py"
    config.write_text(INSIGHTFACE_CONFIG.format(key=FAKE_KEY, rec=rec))
    out = tmp_path / "run"
    proc = _train(config, out)  # 48 images / 12 = 4 steps: one epoch
    assert "wandb is not supported" not in proc.stdout + proc.stderr

    (run,) = wandb_runs(out)
    meta = run["run"]
    expected = ("face-lab", "insightface-config", "tiny insightface config")
    assert (meta["entity"], meta["project"], meta["notes"]) == expected
    name = meta["display_name"]
    assert name.endswith("_GPU0_mbf"), name
    assert run["config"]["network"] == "mbf" and run["config"]["batch_size"] == 12 and "wandb_key" not in run["config"]

    # insightface's names at the `frequent` steps, on the global step, equal to the progress line
    rows, logged = run["rows"], _progress_losses(out)
    assert sorted(logged) == [2, 4]
    for step in (2, 4):
        assert rows[step]["Process/Step"] == step and rows[step]["Process/Epoch"] == 0
        assert rows[step]["Loss/Train Loss"] == pytest.approx(logged[step], abs=1e-4)
        assert rows[step]["Loss/Step Loss"] > 0 and rows[step]["Process/Learning Rate"] > 0
    assert {s for s, row in rows.items() if "Loss/Train Loss" in row} == {2, 4}
    # the verification accuracy after each evaluation (step 2, and the final one)
    log = (out / "training.log").read_text()
    for step in (2, 4):
        flip = float(re.search(rf"\[lfw_style\]\[{step}\]Accuracy-Flip: ([0-9.]+)", log).group(1))
        assert rows[step]["Acc/val-Acc2 lfw_style"] == pytest.approx(flip, abs=1e-5)
        assert "Acc/val-Highest lfw_style" in rows[step] and "Acc/val-XNorm lfw_style" in rows[step]
    assert rows[0]["Train/First Batch._type"] == "image-file"
    assert [a["name"] for a in run["artifacts"]] == [f"{name}_E0", f"{name}_Final"]
    assert run["exit"] and run["exit"][0].get("exit_code", 0) == 0

    # TensorBoard: the same scalars, the config as text, the first batch
    acc = tensorboard(out)
    wandb_names = {k for row in rows.values() for k in row if not k.startswith(("_", "Train/First Batch"))}
    assert set(acc.Tags()["scalars"]) == wandb_names
    assert wandb_names >= {
        "Loss/Step Loss", "Loss/Train Loss", "Process/Step", "Process/Epoch", "Process/Learning Rate",
        "Process/Samples per Second", "Process/Skipped Non-finite Steps", "Acc/val-Acc2 lfw_style",
        "Acc/val-Highest lfw_style", "Acc/val-Std2 lfw_style", "Acc/val-XNorm lfw_style",
    }
    for tag in wandb_names:
        tb = {e.step: e.value for e in acc.Scalars(tag)}
        assert tb == pytest.approx({s: row[tag] for s, row in rows.items() if tag in row}), tag
    assert acc.Tags()["images"] == ["Train/First Batch"] and "config/text_summary" in acc.Tags()["tensors"]

    # the API key is used, never written: not in config.json, training.log, TensorBoard or wandb's files
    assert "wandb_key" not in json.loads((out / "config.json").read_text())
    leaks = [p for p in out.rglob("*") if p.is_file() and FAKE_KEY.encode() in p.read_bytes()]
    assert not leaks, leaks


def test_wandb_resume_continues_the_same_run_after_resume(rec, tmp_path):
    out = tmp_path / "run"
    common = ["configs/ms1mv3_r50", f"--rec={rec}", "--network=mbf", "--embedding_size=128", "--num_classes=12",
              "--num_image=48", "--batch_size=4", "--frequent=1", "--val_targets=[]", "--using_wandb=True",
              "--wandb_resume=True", "--wandb_log_all=False"]
    _train(common[0], out, *common[1:], "--max_steps=1")
    first = json.loads((out / "wandb_run_id.json").read_text())
    _train(common[0], out, *common[1:], "--max_steps=2", "--resume=True")

    runs = wandb_runs(out)
    assert len(runs) == 2  # one offline folder per process, both of the same run
    assert [r["run"]["run_id"] for r in runs] == [first["run_id"]] * 2
    assert runs[1]["run"].get("resume") is True and runs[1]["run"]["display_name"] == first["run_name"]
    assert sorted(s for s, row in runs[0]["rows"].items() if "Loss/Train Loss" in row) == [1]
    assert sorted(s for s, row in runs[1]["rows"].items() if "Loss/Train Loss" in row) == [2]
    assert json.loads((out / "wandb_run_id.json").read_text())["run_id"] == first["run_id"]


_WITHOUT_WANDB = """
import runpy, sys
sys.modules["wandb"] = None  # `import wandb` now raises ImportError, as if it were not installed
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def test_using_wandb_without_the_package_is_one_error_line_before_anything_is_written(rec, tmp_path):
    out = tmp_path / "never"
    args = [PYTHON, "-c", _WITHOUT_WANDB, "configs/ms1mv3_r50", f"--rec={rec}", f"--output={out}", *TINY,
            "--network=mbf", "--using_wandb=True"]
    proc = run_script(args, env={"PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(TESTS_DIR)])}, check=False,
                      timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: using_wandb=True needs the wandb package"), proc.stderr
    assert not out.exists()
