import os
from pathlib import Path

# The repository root, tests/ and tools/ are on sys.path through pytest's `pythonpath`
# (pyproject.toml).
ROOT = Path(__file__).resolve().parents[1]

# Reference files written by the real third-party tools (mxnet, Python 2). ARCFACE_TESTDATA
# points elsewhere when the checkout travels without its sibling folder (e.g. to a GPU box).
SHARED_TESTDATA = Path(os.environ.get("ARCFACE_TESTDATA", ROOT.parent / "shared" / "testdata"))


def copy_ms1m_style(folder: Path) -> Path:
    """The mxnet-written MS1M-style pair (12 identities x 4 images) copied into `folder`."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("train.rec", "train.idx", "property"):
        shutil.copy(SHARED_TESTDATA / "ms1m_style" / name, folder / name)
    return folder
