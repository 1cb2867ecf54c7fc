"""The command-line convention every tool shares (tools/_cli.run_main): --help works, user
errors are one `error:` line with exit code 2, bugs keep their traceback; progress bars
(utils.progress) on a terminal only; tools/export_onnx.py end to end."""
from __future__ import annotations

import io
import re
import runpy
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

import _cli  # tools/ is on sys.path (pyproject.toml)
from backbones import get_model
from helpers import PYTHON, REPO_ROOT, run_script
from utils.errors import EXIT_USER_ERROR, UserError
from utils.progress import progress_bar

TOOLS = REPO_ROOT / "tools"
ENTRY_POINTS = sorted(p.name for p in TOOLS.glob("*.py") if not p.name.startswith("_"))


# ---------------------------------------------------------------------------------------------
# run_main


def test_run_main_prints_a_user_error_as_one_line_and_exits_2(capsys):
    def main():
        raise UserError("data/x.bin: not a verification set")

    with pytest.raises(SystemExit) as exit_info:
        _cli.run_main(main)
    assert exit_info.value.code == EXIT_USER_ERROR == 2
    assert capsys.readouterr().err == "error: data/x.bin: not a verification set\n"


def test_run_main_lets_a_bug_raise_with_its_traceback():
    def main():
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        _cli.run_main(main)


def test_run_main_exits_with_the_code_main_returns():
    for returned, code in ((None, 0), (0, 0), (3, 3)):
        with pytest.raises(SystemExit) as exit_info:
            _cli.run_main(lambda: returned)
        assert exit_info.value.code == code


def test_every_input_error_class_is_a_user_error_and_keeps_its_builtin_base():
    from backbones.weights import WeightsError
    from dataset.errors import DataError
    from dataset.verification_bin import VerificationSetError
    from eval.embedder import EmbedderError
    from utils.checkpoint import CheckpointError
    from utils.config import ConfigError
    from utils.distributed import DeviceError

    for cls, builtin in (
        (ConfigError, ValueError), (DataError, ValueError), (VerificationSetError, ValueError),
        (CheckpointError, RuntimeError), (DeviceError, RuntimeError), (EmbedderError, ValueError),
        (WeightsError, ValueError),
    ):
        assert issubclass(cls, UserError) and issubclass(cls, builtin), cls
    assert _cli.UserError is UserError  # the tools raise the one base, not a copy


@pytest.mark.parametrize("tool", ENTRY_POINTS)
def test_every_tool_answers_help(tool, monkeypatch, capsys):
    # Run as `python tools/<tool> --help` would, in this process (the other tests start each
    # tool as a script; torch is imported once here instead of once per tool).
    monkeypatch.setattr(sys, "argv", [str(TOOLS / tool), "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(TOOLS / tool), run_name="__main__")
    out = capsys.readouterr()
    assert exit_info.value.code == 0 and out.out.startswith("usage:") and out.err == ""


# ---------------------------------------------------------------------------------------------
# Progress bars


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _count_to(n, stream, **kwargs):
    with progress_bar(total=n, desc="packing", file=stream, mininterval=0, **kwargs) as bar:
        for _ in range(n):
            bar.update(1)
    return stream.getvalue()


def test_a_bar_on_a_terminal_shows_the_count_the_rate_and_the_time_left(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    text = _count_to(40, _Terminal())
    last = text.rstrip().split("\r")[-1]
    assert last.startswith("packing: 100%") and "40/40" in last
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d, +[\d.]+img/s\]", last), last  # elapsed<remaining, rate


def test_no_bar_when_not_a_terminal_or_under_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    assert _count_to(40, io.StringIO()) == ""  # a log file or a pipe
    for value in ("true", "1"):
        monkeypatch.setenv("CI", value)
        assert _count_to(40, _Terminal()) == ""
    monkeypatch.setenv("CI", "false")
    assert "40/40" in _count_to(40, _Terminal())


# ---------------------------------------------------------------------------------------------
# export_onnx.py


@pytest.fixture(scope="module")
def mbf_weights(tmp_path_factory):
    torch.manual_seed(0)
    net = get_model("mbf", num_features=128).eval()
    path = tmp_path_factory.mktemp("weights") / "model.pt"
    # As a DDP training run's checkpoint holds it: the one weight loader unwraps and strips it.
    torch.save({"state_dict_backbone": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    return net, path


@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")
def test_export_onnx_cli_writes_a_graph_that_computes_the_network(mbf_weights, tmp_path):
    net, weights = mbf_weights
    out = tmp_path / "mbf.onnx"
    proc = run_script([PYTHON, TOOLS / "export_onnx.py", weights, "--network", "mbf", "--output", out])
    assert f"wrote {out} (embedding size 128;" in proc.stdout
    x = torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(1)) * 2 - 1
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"data": x.numpy()})[0]
    with torch.no_grad():
        want = net(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize(
    "network, weights_name, message",
    [
        ("r18", None, "the weights do not fit network 'r18': missing"),
        ("r51", None, "unknown network 'r51'"),
        ("mbf", "missing.pt", "missing.pt: weights file not found"),
    ],
)
def test_export_onnx_cli_bad_input_is_one_line_and_writes_nothing(
    mbf_weights, tmp_path, capsys, network, weights_name, message
):
    import export_onnx

    weights = tmp_path / weights_name if weights_name else mbf_weights[1]
    out = tmp_path / "out.onnx"
    with pytest.raises(SystemExit) as exit_info:
        _cli.run_main(lambda: export_onnx.main([str(weights), "--network", network, "--output", str(out)]))
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == EXIT_USER_ERROR and len(lines) == 1 and lines[0].startswith("error: ")
    assert message in lines[0] and not out.exists() and list(tmp_path.iterdir()) == []
