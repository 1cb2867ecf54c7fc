"""Which run an output folder belongs to, so that an elastic restart continues its own run.

torchrun restarts the workers of every node when one of them fails, but it advances
TORCHELASTIC_RESTART_COUNT only on the node whose worker failed (a healthy node restarted
for another node's failure keeps counting 0, and a replaced node starts at 0). So a worker
cannot tell from its own counter whether it is a restart. Instead every start of a run
records who it is in `<output>/run.json`:

    {"run_id": TORCHELASTIC_RUN_ID, "job_id": the job's id, "config": a fingerprint of the config}

`job_id` is kept in the store that torchrun's agents hold for the whole job
(`DistContext.job_id`): every rank and every restart of the job reads the same value, and
another job -- even with the same --rdzv-id and command line -- has another one. A worker
started by torchelastic continues the run in `output` when run.json names this run id,
this job and this configuration, on every node alike; a fresh job into the folder of
another run is still refused unless it asks for --resume=True.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from utils.checkpoint import atomic_write_text
from utils.distributed import DistContext, broadcast_object

RUN_FILE = "run.json"
# Keys that may differ between the starts of one run without making it another run.
_NOT_IDENTITY = ("resume",)


@dataclass(frozen=True)
class RunIdentity:
    run_id: str | None  # TORCHELASTIC_RUN_ID (torchrun's --rdzv-id, a fresh uuid with --standalone)
    job_id: str | None  # DistContext.job_id: None when the agents share no store
    config: str  # fingerprint of the effective configuration

    @property
    def elastic(self) -> bool:
        """Started by torchelastic, which restarts failed workers by itself."""
        return self.run_id is not None


def config_fingerprint(cfg: dict) -> str:
    """A short hash of the effective configuration (tuples and lists alike)."""
    plain = {k: v for k, v in dict(cfg).items() if k not in _NOT_IDENTITY}
    text = json.dumps(plain, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def of_this_launch(cfg: dict, ctx: DistContext) -> RunIdentity:
    return RunIdentity(os.environ.get("TORCHELASTIC_RUN_ID"), ctx.job_id, config_fingerprint(cfg))


def read(output: str | os.PathLike) -> RunIdentity | None:
    """The identity recorded in `output`, or None (no record, or not one of ours)."""
    try:
        record = json.loads((Path(output) / RUN_FILE).read_text())
        return RunIdentity(record["run_id"], record["job_id"], str(record["config"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def continues_this_run(output: str | os.PathLike, identity: RunIdentity, ctx: DistContext) -> bool:
    """True on every rank when this start is a torchelastic restart of the run recorded in `output`.

    Collective: rank 0 reads the record and every rank follows its answer, so nodes whose
    views of a shared file system differ still decide alike.
    """
    answer = None
    if ctx.is_main:
        answer = identity.elastic and read(output) == identity
    return bool(broadcast_object(answer, ctx))


def record(output: str | os.PathLike, identity: RunIdentity) -> None:
    """Write `output/run.json` (rank 0, once the run is accepted): later restarts of this job continue it."""
    atomic_write_text(json.dumps(asdict(identity), indent=2) + "\n", Path(output) / RUN_FILE)
