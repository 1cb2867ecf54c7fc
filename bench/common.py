"""What the benchmarks share: device set-up, timing, memory peaks and the machine description.

Every benchmark compares paths *within one run* on the same inputs, interleaving their
steps, so that other load on the machine slows all of them alike and the ratios stay
meaningful even when the absolute numbers move.
"""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from utils.host_memory import enable_huge_pages  # noqa: F401  (the benchmarks use train.py's setting)

ROOT = Path(__file__).resolve().parents[1]


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name} requested but CUDA is not available")
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds that fn() takes, with the device's queued work finished before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def summarize(times: list[float]) -> dict:
    """Per-step times. The reported number is the fastest step (`min_s`): other processes
    on the machine only ever make a step slower, so the minimum is the least disturbed
    estimate (as timeit reports it); the median is kept for reference."""
    return {"min_s": min(times), "median_s": statistics.median(times), "steps": len(times),
            "times_s": [round(t, 5) for t in times]}


# ---- memory -------------------------------------------------------------------------------

def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of a code region in bytes, above what was in use when it started.

    CUDA: torch.cuda.max_memory_allocated (tensors only, exact). CPU: the resident set's
    high-water mark (VmHWM), reset at the start through /proc/self/clear_refs, minus the
    resident set at that moment. That counts every allocation of the process, so run each
    case in a fresh process (the caller's job) and compare cases measured the same way.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.supported = device.type == "cuda" or _proc_status_kib("VmHWM") is not None
        self.start = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        elif self.supported:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current VmRSS
            except OSError:
                self.supported = False
            self.start = (_proc_status_kib("VmRSS") or 0) * 1024
        return self

    def __exit__(self, *exc) -> None:
        pass

    def peak_bytes(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.start
        if not self.supported:
            return None
        return (_proc_status_kib("VmHWM") or 0) * 1024 - self.start


def available_memory_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ---- the machine ------------------------------------------------------------------------

class OtherLoad:
    """CPU time that processes other than this suite (and the children it waited for) used.

    The load average cannot tell a quiet machine from a shared one here: the suite's own
    threads count in it, and so does whatever ran in the minute before. /proc/stat's busy
    time minus this process tree's CPU time is what everybody else took.
    """

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields
        busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
        own = sum(os.times()[:4])  # user + system of this process and of its waited-for children
        return time.monotonic(), busy, own

    def cores(self) -> float | None:
        """Average number of cores other processes kept busy since construction."""
        now = self._sample()
        if self._start is None or now is None or now[0] <= self._start[0]:
            return None
        wall, busy, own = (b - a for a, b in zip(self._start, now))
        return max(0.0, busy - own) / wall


def cpu_model() -> str:
    """The CPU's name with its family and model numbers, which say the generation where the
    name does not ('AMD EPYC (family 26, model 2)': Zen 5; Intel's family 6 model 143: Sapphire
    Rapids)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def cpu_matrix_units() -> str:
    """The CPU's bf16/int8 matrix instructions, which decide what bf16 autocast can gain."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    found = [f for f in ("amx_bf16", "amx_tile", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx512f") if f in flags]
    return " ".join(found) if found else "none of amx/avx512"


# The variables that hold torch's, oneDNN's and MKL's kernels to a smaller instruction set. Set
# on an AVX512/AMX machine, they give the code paths an AVX2-only CPU takes (`make bench-avx2`):
# vectorised kernels, oneDNN's convolutions and bf16 matmuls, and precision=auto's choice (fp32).
# MKL_ENABLE_INSTRUCTIONS because torch's fp32 matmuls (linear layers, the PartialFC logits) are
# MKL's sgemm, not oneDNN's: without it an Intel host runs them with AVX512 (MKL_VERBOSE=1 names
# the code path; on AMD, MKL takes its generic path whatever the setting).
ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def isa_limits() -> dict[str, str]:
    return {name: os.environ[name] for name in ISA_LIMITS if os.environ.get(name)}


def _amx_usable() -> bool:
    """The CPU has AMX's bf16 tiles and oneDNN is not held below them (ONEDNN_MAX_CPU_ISA)."""
    from utils.amp import onednn_isa_allows

    return "amx_bf16" in cpu_matrix_units().split() and onednn_isa_allows("AMX")


def cpu_kind() -> str:
    """The kind of CPU as far as training speed goes, the name of its results file, after any
    limit in ISA_LIMITS: cpu_amx_bf16 (AMX tiles, e.g. Sapphire Rapids) and cpu_avx512_bf16
    (AVX512-BF16 without AMX, e.g. AMD Zen 4 and Zen 5), where the default path is bf16 autocast but
    the step runs at very different speeds; cpu_avx512 or cpu_avx2 (fp32)."""
    from utils.amp import bf16_is_fast

    if bf16_is_fast(torch.device("cpu")):
        return "cpu_amx_bf16" if _amx_usable() else "cpu_avx512_bf16"
    return "cpu_" + torch.backends.cpu.get_cpu_capability().lower()


def machine_info(device: torch.device) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device.type,
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_matrix_units": cpu_matrix_units(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_kind": cpu_kind(),
        "isa_limits": isa_limits(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        info["onnxruntime"] = None
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            kernel = f.read().split("[", 1)[1].split("]", 1)[0]
    except (OSError, IndexError):
        kernel = "n/a"
    info["huge_pages"] = f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}, kernel THP {kernel}"
    try:
        info["load_average_at_start"] = os.getloadavg()[0]
    except OSError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
            gpu_count=torch.cuda.device_count(),
        )
    return info


def default_precision(device: torch.device):
    """The precision train.py picks by default: bf16 where the CPU has bf16 units, fp16 with
    a GradScaler on CUDA (the shipped configs set fp16=True), fp32 otherwise."""
    from utils.amp import resolve_precision

    return resolve_precision("auto", device.type == "cuda", device)
