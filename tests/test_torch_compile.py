"""utils.torch_compile: a graph compiled under one ATEN_CPU_CAPABILITY is never served to another."""
import os
import subprocess
import sys

from utils.torch_compile import CACHE_DIR_VARIABLE, CAPABILITY_VARIABLE, inductor_cache_dir_for_capability
from tests.helpers import REPO_ROOT

# A PReLU-like gradient: a masked product, a per-channel sum and an element-wise select, the
# kind of graph inductor vectorises. The child prints the largest difference from eager.
_CHILD = """
import torch
from utils.torch_compile import compile_module

class Gradient(torch.nn.Module):
    def forward(self, g, x, w):
        negative = torch.where(x > 0, torch.zeros_like(g), g)
        return torch.where(x > 0, g, g * w.view(1, -1, 1, 1)), (negative * x).sum((0, 2, 3))

torch.manual_seed(0)
g, x = torch.randn(4, 32, 9, 9), torch.randn(4, 32, 9, 9)
w = torch.rand(32)
eager = Gradient()(g, x, w)
compiled = compile_module(Gradient())(g, x, w)
print(max((a - b).abs().max().item() for a, b in zip(eager, compiled)))
"""


def _compile_in_child(cache_dir, capability=None):
    env = {k: v for k, v in os.environ.items() if k != CAPABILITY_VARIABLE}
    env[CACHE_DIR_VARIABLE] = str(cache_dir)
    if capability is not None:
        env[CAPABILITY_VARIABLE] = capability
    return subprocess.run([sys.executable, "-c", _CHILD], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=600)


def _cached_graphs(directory):
    return [name for _, _, names in os.walk(directory / "fxgraph") for name in names]


def test_a_graph_cached_with_the_cpus_own_isa_is_not_served_to_another_capability(tmp_path):
    # torch 2.13 serves it: with ATEN_CPU_CAPABILITY=default (no vectorisation) the cached
    # vectorised C++ fails to compile; with =avx2 on an AVX512 CPU the numbers are wrong.
    cache = tmp_path / "inductor"
    native = _compile_in_child(cache)
    assert native.returncode == 0, native.stderr[-3000:]
    assert float(native.stdout.split()[-1]) < 1e-4
    assert _cached_graphs(cache)  # the cache was really written

    scalar = _compile_in_child(cache, "default")
    assert scalar.returncode == 0, scalar.stderr[-3000:]
    assert float(scalar.stdout.split()[-1]) < 1e-4
    assert _cached_graphs(cache / "aten_cpu_capability_default")  # compiled again, into its own directory


def test_the_capabilitys_directory_is_below_the_users_and_is_not_nested_twice(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(tmp_path / "mine"))
    monkeypatch.setenv(CAPABILITY_VARIABLE, " AVX2 ")
    first = inductor_cache_dir_for_capability()
    assert first == str(tmp_path / "mine" / "aten_cpu_capability_avx2")
    assert os.environ[CACHE_DIR_VARIABLE] == first
    assert inductor_cache_dir_for_capability() == first  # a second compile in the same process


def test_without_the_variable_the_cache_is_left_as_the_user_set_it(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(tmp_path / "mine"))
    monkeypatch.delenv(CAPABILITY_VARIABLE, raising=False)
    assert inductor_cache_dir_for_capability() is None
    assert os.environ[CACHE_DIR_VARIABLE] == str(tmp_path / "mine")
