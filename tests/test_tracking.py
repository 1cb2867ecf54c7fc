"""Experiment tracking (utils/tracking.py): wandb runs written offline and read back with
wandb's own reader (`wandb leet inspect --json`, the Go core's .wandb decoder), TensorBoard
read back with tensorboard's EventAccumulator, two ranks, resume after a killed process,
a missing wandb package and a failing login.

The Tracker is driven by `simulated_training`, a small loop that calls it the way the
training script does (config, first batch, log steps, epoch ends, verification, end).
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import PYTHON, REPO_ROOT, free_port, run_distributed, run_script

TESTS_DIR = Path(__file__).resolve().parent
FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # 40 characters, as a real API key
EPOCH_STEPS = 3  # the simulated run's steps per epoch
FREQUENT = 2


def _env(home: Path) -> dict:
    """wandb offline, with a private HOME: no ~/.netrc, settings or caches of the user apply."""
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "HOME": str(home)}


@pytest.fixture(autouse=True)
def isolated_wandb(monkeypatch, tmp_path):
    for name, value in _env(tmp_path / "home").items():
        monkeypatch.setenv(name, value)
    # WANDB_SERVICE: wandb puts its service's address there once this process started a run;
    # child processes (the ranks, the scripts below) must start their own, as real ranks do.
    for name in ("WANDB_API_KEY", "WANDB_DATA_DIR", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_BASE_URL", "WANDB_SERVICE"):
        monkeypatch.delenv(name, raising=False)


def make_cfg(output, **overrides):
    from utils.config import load_config

    args = [f"--output={output}", f"--frequent={FREQUENT}"] + [f"--{k}={v!r}" for k, v in overrides.items()]
    return load_config("configs/ms1mv3_r50", args)


def train_metrics(step: int, rank: int, offset: float = 0.0) -> dict:
    """Distinct figures per step, rank and run, so that every row can be told apart."""
    return {
        "loss": 20.0 - step + rank + offset,
        "step_loss": 20.25 - step + rank + offset,
        "lr": 0.1 / step,
        "samples_per_sec": 100.0 + step + offset,
        "grad_scale": 65536.0,
        "distill": 0.5 * step,
    }


def first_batch() -> torch.Tensor:
    """A normalised training batch, (x / 255 - 0.5) / 0.5, as the loader hands it over."""
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (10, 3, 112, 112), generator=g, dtype=torch.uint8)
    return (raw.float() / 255.0 - 0.5) / 0.5


def simulated_training(cfg, ctx, start_step=0, end_step=6, offset=0.0, close=True):
    """Call the Tracker as train.py does; model.pt differs per epoch."""
    from utils.tracking import Tracker

    Tracker.check(cfg)
    os.makedirs(cfg.output, exist_ok=True)
    tracker = Tracker.create(cfg, ctx, cfg.output, start_step=start_step)
    tracker.log_config(cfg)
    tracker.log_images("Train/First Batch", first_batch(), start_step)
    model_path = os.path.join(cfg.output, "model.pt")
    for step in range(start_step + 1, end_step + 1):
        epoch = (step - 1) // EPOCH_STEPS
        if step % FREQUENT == 0:
            tracker.log_train(step, train_metrics(step, ctx.rank, offset), epoch)
        if step % EPOCH_STEPS == 0 and ctx.is_main:
            torch.save({"epoch": torch.tensor(epoch)}, model_path)
            tracker.save_model(model_path, epoch=epoch)
    tracker.log_eval(end_step, "lfw", 0.9 + offset / 100, 0.95, {"std": 0.01, "xnorm": 20.0})
    if ctx.is_main:
        torch.save({"epoch": torch.tensor(-1)}, model_path)
        tracker.save_model(model_path, final=True)
    if close:
        tracker.close()
    return tracker


# ---- reading back -------------------------------------------------------------------

def wandb_runs(output) -> list[dict]:
    """Every offline run under <output>/wandb, oldest first, decoded by wandb itself.

    `wandb leet inspect --json FILE` prints a .wandb file's records; it runs the wandb-core
    binary with the arguments below, which this calls directly to save a Python start-up
    (seconds on a loaded machine) per file.
    """
    from wandb.util import get_core_path

    runs = []
    for path in sorted(Path(output, "wandb").glob("offline-run-*/run-*.wandb")):
        command = [get_core_path(), "leet", "inspect", "--json", "--run-file", path, path.parent.parent]
        proc = run_script(command, timeout=120)
        records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
        # None when the process was killed before wandb wrote more than the file header
        run = next((r["run"] for r in records if r["type"] == "run"), None)
        config = dict(run.get("config", {}).get("update", {})) if run else {}
        for r in records:
            if r["type"] == "config":
                config.update(r["config"].get("update", {}))
        rows = {}
        for r in records:
            if r["type"] == "history":
                item = r["history"]["item"]
                rows.setdefault(item["_step"], {}).update(item)
        artifacts = [r["artifact"] for r in records if r["type"] == "artifact"]
        runs.append({"path": path, "run": run, "config": config, "rows": rows, "artifacts": artifacts,
                     "exit": [r["exit"] for r in records if r["type"] == "exit"], "raw": proc.stdout})
    return runs


def tensorboard(output):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(output) / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def expected_train_rows(steps, rank, offset=0.0) -> dict[int, dict]:
    from utils.tracking import TRAIN_METRIC_NAMES

    rows = {}
    for step in steps:
        row = {"Process/Step": step, "Process/Epoch": (step - 1) // EPOCH_STEPS, "Train/distill": 0.5 * step}
        for key, value in train_metrics(step, rank, offset).items():
            if key in TRAIN_METRIC_NAMES:
                row[TRAIN_METRIC_NAMES[key]] = value
        rows[step] = row
    return rows


def assert_rows(actual: dict, expected: dict) -> None:
    for step, row in expected.items():
        assert step in actual, f"no history row for step {step}; rows: {sorted(actual)}"
        for name, value in row.items():
            assert actual[step].get(name) == pytest.approx(value), (step, name, actual[step])


# ---- one process, offline -----------------------------------------------------------

@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("offline") / "run"
    with pytest.MonkeyPatch.context() as mp:
        for name, value in _env(out.parent / "home").items():
            mp.setenv(name, value)
        for name in ("WANDB_API_KEY", "WANDB_DATA_DIR"):
            mp.delenv(name, raising=False)
        from utils.distributed import DistContext

        cfg = make_cfg(
            out, using_wandb=True, wandb_entity="face-lab", wandb_project="arcface-tests", notes="tiny offline run",
            suffix_run_name="smoke", save_artifacts=True, wandb_key=FAKE_KEY,
        )
        simulated_training(cfg, DistContext())
    return out, cfg


def test_offline_wandb_run_has_insightface_metrics_config_notes_and_artifacts(offline_run):
    out, cfg = offline_run
    (run,) = wandb_runs(out)
    meta = run["run"]
    assert meta["entity"] == "face-lab" and meta["project"] == "arcface-tests" and meta["notes"] == "tiny offline run"
    name = meta["display_name"]
    assert name.endswith("_GPU0_smoke") and len(name.split("_")[0]) == 6 and len(name.split("_")[1]) == 4, name
    assert json.loads((out / "wandb_run_id.json").read_text())["run_id"] == meta["run_id"]

    # the config, without the API key anywhere in the run
    assert run["config"]["network"] == "r50" and run["config"]["lr"] == cfg.lr
    assert run["config"]["margin_list"] == list(cfg.margin_list) and run["config"]["notes"] == "tiny offline run"
    assert "wandb_key" not in run["config"] and FAKE_KEY not in run["raw"]

    # insightface's names at the log steps, x-axis = global step; verification at the last step
    assert_rows(run["rows"], expected_train_rows([2, 4, 6], rank=0))
    assert run["rows"][6]["Acc/val-Acc2 lfw"] == pytest.approx(0.9)
    assert run["rows"][6]["Acc/val-Highest lfw"] == pytest.approx(0.95)
    assert run["rows"][6]["Acc/val-XNorm lfw"] == pytest.approx(20.0)
    assert run["rows"][6]["Acc/val-Std2 lfw"] == pytest.approx(0.01)
    assert {s for s, row in run["rows"].items() if "Loss/Train Loss" in row} == {2, 4, 6}  # `frequent` steps only
    image = run["rows"][0]
    assert image["Train/First Batch._type"] == "image-file" and image["Train/First Batch.width"] == 2 + 8 * 114
    assert (run["path"].parent / "files" / image["Train/First Batch.path"]).is_file()
    assert run["exit"] and run["exit"][0].get("exit_code", 0) == 0

    # artifacts: one per epoch and the final one, each with the model.pt of its moment,
    # staged in the output folder (not in ~/.local/share/wandb)
    names = [a["name"] for a in run["artifacts"]]
    assert names == [f"{name}_E0", f"{name}_E1", f"{name}_Final"]
    for artifact, epoch in zip(run["artifacts"], [0, 1, -1]):
        assert artifact["type"] == "model"
        (entry,) = artifact["manifest"]["contents"]
        assert entry["path"] == "model.pt"
        staged = Path(entry["local_path"])
        assert staged.is_relative_to(out), staged
        assert int(torch.load(staged, weights_only=True)["epoch"]) == epoch
    assert not (out.parent / "home" / ".local").exists()


def test_tensorboard_has_the_same_scalars_the_config_and_the_first_batch(offline_run):
    out, cfg = offline_run
    (run,) = wandb_runs(out)
    acc = tensorboard(out)
    scalar_tags = set(acc.Tags()["scalars"])
    wandb_names = {k for row in run["rows"].values() for k in row if not k.startswith(("_", "Train/First Batch"))}
    assert scalar_tags == wandb_names
    for tag in scalar_tags:
        tb = {e.step: e.value for e in acc.Scalars(tag)}
        wb = {step: row[tag] for step, row in run["rows"].items() if tag in row}
        assert tb.keys() == wb.keys() and all(tb[s] == pytest.approx(wb[s]) for s in tb), tag

    (text,) = acc.Tensors("config/text_summary")
    config_text = text.tensor_proto.string_val[0].decode()
    assert "network" in config_text and "'r50'" in config_text and FAKE_KEY not in config_text

    # the first batch, de-normalised: the grid holds the original uint8 pixels
    from PIL import Image

    (picture,) = acc.Images("Train/First Batch")
    grid = np.asarray(Image.open(io.BytesIO(picture.encoded_image_string)).convert("RGB"))
    assert grid.shape == (2 + 2 * 114, 2 + 8 * 114, 3)  # 10 images: 2 rows of 8, 2 px padding
    raw = ((first_batch() * 0.5 + 0.5) * 255).round().to(torch.uint8)
    assert np.array_equal(grid[2:114, 2:114], raw[0].permute(1, 2, 0).numpy())
    assert np.array_equal(grid[116:228, 2 + 114:2 + 114 + 112], raw[9].permute(1, 2, 0).numpy())


def test_without_wandb_tensorboard_gets_everything_and_no_wandb_files(tmp_path):
    from utils.distributed import DistContext

    out = tmp_path / "run"
    simulated_training(make_cfg(out, using_wandb=False, save_artifacts=True), DistContext())
    assert not (out / "wandb").exists() and not (out / "wandb_run_id.json").exists()
    acc = tensorboard(out)
    loss = {e.step: e.value for e in acc.Scalars("Loss/Train Loss")}
    assert loss == pytest.approx({s: train_metrics(s, 0)["loss"] for s in (2, 4, 6)})
    assert acc.Scalars("Acc/val-Acc2 lfw")[0].value == pytest.approx(0.9)


@pytest.mark.parametrize(
    "key, expected", [("X" * 40, None), ("", None), (None, None), (FAKE_KEY, FAKE_KEY)]
)
def test_only_a_real_wandb_key_is_used(key, expected):
    from utils.tracking import api_key

    assert api_key({"wandb_key": key}) == expected


# ---- two ranks ----------------------------------------------------------------------

def _two_rank_worker(ctx, root):
    for log_all in (False, True):
        out = Path(root) / ("every_rank" if log_all else "rank0")
        cfg = make_cfg(out, using_wandb=True, wandb_log_all=log_all, save_artifacts=True)
        simulated_training(cfg, ctx)
        ctx.barrier()


def test_two_ranks_make_one_run_unless_wandb_log_all(tmp_path):
    run_distributed(_two_rank_worker, 2, str(tmp_path))

    (only,) = wandb_runs(tmp_path / "rank0")
    assert only["run"]["display_name"].endswith("_GPU0")
    assert_rows(only["rows"], expected_train_rows([2, 4, 6], rank=0))
    assert len(list((tmp_path / "rank0" / "tensorboard").glob("events.out.tfevents.*"))) == 1

    runs = sorted(wandb_runs(tmp_path / "every_rank"), key=lambda r: r["run"]["display_name"][-4:])
    assert [r["run"]["display_name"][-5:] for r in runs] == ["_GPU0", "_GPU1"]
    assert runs[0]["run"]["run_id"] != runs[1]["run"]["run_id"]
    for rank, run in enumerate(runs):
        assert_rows(run["rows"], expected_train_rows([2, 4, 6], rank=rank))  # each rank its own loss
    assert len(runs[0]["artifacts"]) == 3 and runs[1]["artifacts"] == []  # model.pt is rank 0's
    ids = {json.loads(p.read_text())["run_id"] for p in (tmp_path / "every_rank").glob("wandb_run_id*.json")}
    assert ids == {r["run"]["run_id"] for r in runs}


# ---- resume -------------------------------------------------------------------------

_INTERRUPTED_RUN = """
import os, sys, time
from test_tracking import make_cfg, train_metrics
from utils.distributed import DistContext
from utils.tracking import Tracker
cfg = make_cfg(sys.argv[1], using_wandb=True, wandb_resume=True)
tracker = Tracker.create(cfg, DistContext(), cfg.output)
for step in (2, 4):
    tracker.log_train(step, train_metrics(step, 0), 0)
print("logged", flush=True)
time.sleep(600)  # killed here, like a worker of a failed node
"""


def test_wandb_resume_continues_the_run_of_a_killed_process(tmp_path):
    from utils.distributed import DistContext

    out = tmp_path / "run"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(TESTS_DIR)]))
    proc = subprocess.Popen([PYTHON, "-c", _INTERRUPTED_RUN, str(out)], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "logged", line + proc.stdout.read()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    first = json.loads((out / "wandb_run_id.json").read_text())

    # the restarted process resumes from the checkpoint of step 2 and logs steps 4 and 6
    time.sleep(1.1)  # offline run folders are named by the second
    cfg = make_cfg(out, using_wandb=True, wandb_resume=True)
    tracker = simulated_training(cfg, DistContext(), start_step=2, end_step=6, offset=100.0)
    assert tracker.run_name == first["run_name"]

    runs = wandb_runs(out)
    assert [r["path"].name for r in runs] == [f"run-{first['run_id']}.wandb"] * 2  # killed, resumed
    resumed = runs[-1]["run"]
    assert resumed["run_id"] == first["run_id"] and resumed.get("resume") is True
    assert resumed["display_name"] == first["run_name"]
    assert_rows(runs[-1]["rows"], expected_train_rows([4, 6], rank=0, offset=100.0))

    # TensorBoard hides what the killed process wrote after the resumed step
    loss = {e.step: e.value for e in tensorboard(out).Scalars("Loss/Train Loss")}
    assert loss == pytest.approx({4: train_metrics(4, 0, 100.0)["loss"], 6: train_metrics(6, 0, 100.0)["loss"]})

    # without wandb_resume the same folder starts a new run
    time.sleep(1.1)
    simulated_training(make_cfg(out, using_wandb=True, wandb_resume=False), DistContext(), start_step=6, end_step=8)
    newest = wandb_runs(out)[-1]["run"]
    assert newest["run_id"] != first["run_id"] and not newest.get("resume")


# ---- faults -------------------------------------------------------------------------

_WITHOUT_WANDB = """
import sys
sys.modules["wandb"] = None  # `import wandb` now raises ImportError, as if it were not installed
from test_tracking import make_cfg
from utils.errors import UserError
from utils.tracking import Tracker
Tracker.check(make_cfg(sys.argv[1], using_wandb=False))  # fine without the package
try:
    Tracker.check(make_cfg(sys.argv[1], using_wandb=True))
except UserError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)
"""


def test_using_wandb_without_the_package_is_one_clear_error_and_writes_nothing(tmp_path):
    out = tmp_path / "never"
    env = {"PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(TESTS_DIR)])}
    proc = run_script([PYTHON, "-c", _WITHOUT_WANDB, out], env=env, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: using_wandb=True needs the wandb package"), proc.stderr
    assert "pip install" in lines[0]
    assert not out.exists()


_FAILING_LOGIN = """
import sys
from test_tracking import make_cfg, simulated_training
from utils.distributed import DistContext
from utils.log import setup_logging
setup_logging(0)
cfg = make_cfg(sys.argv[1], using_wandb=True, wandb_key=sys.argv[2], save_artifacts=True)
tracker = simulated_training(cfg, DistContext())
assert tracker.run is None
print("training went on", flush=True)
"""


@pytest.mark.parametrize("key, env_key, reason", [
    (FAKE_KEY, None, "127.0.0.1:{port}"),  # the server is unreachable: the warning names it
    ("X" * 40, FAKE_KEY, "127.0.0.1:{port}"),  # the placeholder: WANDB_API_KEY is used (and tried)
    ("X" * 40, None, "No API key configured"),  # the placeholder, and no key anywhere else
], ids=["unreachable_server", "key_from_environment", "no_api_key"])
def test_failing_login_is_a_warning_and_tensorboard_keeps_everything(tmp_path, key, env_key, reason):
    closed_port = free_port()  # nothing listens there
    env = {
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(TESTS_DIR)]),
        "WANDB_MODE": "online",
        "WANDB_BASE_URL": f"http://127.0.0.1:{closed_port}",
        "WANDB_INIT_TIMEOUT": "3",
        "HOME": str(tmp_path / "home"),  # no key stored by `wandb login`
    }
    if env_key:
        env["WANDB_API_KEY"] = env_key
    out = tmp_path / "run"
    proc = run_script([PYTHON, "-c", _FAILING_LOGIN, out, key], env=env, check=False, timeout=240)
    assert proc.returncode == 0 and "training went on" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    (warning,) = [line for line in proc.stdout.splitlines() if "wandb could not start a run" in line]
    assert reason.format(port=closed_port) in warning and "training continues without wandb" in warning, warning
    assert not (out / "wandb_run_id.json").exists()
    loss = {e.step: e.value for e in tensorboard(out).Scalars("Loss/Train Loss")}
    assert loss == pytest.approx({s: train_metrics(s, 0)["loss"] for s in (2, 4, 6)})
