import os
from pathlib import Path

# The repository root, tests/ and tools/ are on sys.path through pytest's `pythonpath`
# (pyproject.toml).
ROOT = Path(__file__).resolve().parents[1]

# Reference files written by the real third-party tools (mxnet, Python 2). ARCFACE_TESTDATA
# points elsewhere when the checkout travels without its sibling folder (e.g. to a GPU box).
SHARED_TESTDATA = Path(os.environ.get("ARCFACE_TESTDATA", ROOT.parent / "shared" / "testdata"))


def pytest_configure(config):
    """One intra-op thread in the test process, as in the processes the tests start
    (helpers.py sets OMP_NUM_THREADS=1 there), unless OMP_NUM_THREADS says otherwise.

    The suite's processes share the machine's cores: a test process with one OpenMP thread per
    core competes with the training processes it starts, and with itself under `pytest -n`.
    Measured on the 2-core machine while loaded, a backbone's forward and backward ran 3 to 4
    times slower with 2 threads than with 1 (OpenMP threads spin, waiting for a busy core).
    """
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by every process the tests start
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def copy_ms1m_style(folder: Path) -> Path:
    """The mxnet-written MS1M-style pair (12 identities x 4 images) copied into `folder`."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("train.rec", "train.idx", "property"):
        shutil.copy(SHARED_TESTDATA / "ms1m_style" / name, folder / name)
    return folder
