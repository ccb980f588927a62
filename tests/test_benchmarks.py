"""benchmarks/step_overhead.py: the targets table's arithmetic, the CPU smoke run of the mixed-precision
(--autocast bf16) path, and the clear refusal of --device cuda without a GPU. No timing is asserted."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "step_overhead.py"


@pytest.fixture(scope="module")
def bench():
    """The benchmark module, its import-time settings (inductor cache switch, dynamo limits) undone after."""
    env = os.environ.get("TORCHINDUCTOR_FORCE_DISABLE_CACHES")
    knobs = {k: getattr(torch._dynamo.config, k) for k in ("cache_size_limit", "recompile_limit")
             if hasattr(torch._dynamo.config, k)}
    spec = importlib.util.spec_from_file_location("step_overhead", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["step_overhead"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["step_overhead"]
    if env is None:
        os.environ.pop("TORCHINDUCTOR_FORCE_DISABLE_CACHES", None)
    else:
        os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = env
    for k, v in knobs.items():
        setattr(torch._dynamo.config, k, v)


def test_targets_table_ratios_and_verdicts(bench):
    R = bench.Result
    res = {
        "mlp": {
            "plain eager": R(0.0, [10.0]), "plain inductor": R(2.0, [8.0]),
            "torch SN eager": R(0.0, [20.0]), "torch SN inductor": R(3.0, [8.2]),
            "fx_spectral eager": R(0.0, [11.0]), 'backend="spectral"': R(2.6, [8.3]),
        },
        "gpt": {"plain eager": R(0.0, [100.0]), "torch SN eager": R(0.0, [104.0]),
                "fx_spectral eager": R(0.0, [99.0])},
    }
    rows = {line.split(" | ")[0].lstrip("| "): line for line in bench.targets_table(res) if line.startswith("| ")}
    best = rows["best fx_spectral ≤ 1.05× best plain"]
    assert "1.04× (backend=\"spectral\") met" in best and "0.99× (fx_spectral eager) met" in best
    assert "1.04× met" in rows['backend="spectral" ≤ 1.05× plain inductor']
    assert "1.01× **MISSED**" in rows['backend="spectral" faster than torch SN inductor']
    eager = rows["fx_spectral eager ≥ 5% faster than torch SN eager (≤ 0.95×)"]
    assert eager.endswith("| 0.55× met | 0.95× **MISSED** |")  # 99 / 104 = 0.952 > 0.95
    mlp_only = rows["fx_spectral eager ≤ 1.15× plain eager (MLP)"]
    assert mlp_only.endswith("| 1.10× met | – |")
    assert "1.30× **MISSED**" in rows['first call (caches off): backend="spectral" ≤ 1.2× plain inductor']


def test_quick_run_with_bf16_autocast_on_cpu(bench, tmp_path, monkeypatch, one_thread):
    """The --device/--autocast path end to end (the CUDA run differs by device and clock only), on a
    small stand-in for the MLP so that the test stays fast."""
    small = bench.Case(bench.CASES["mlp"].title, lambda: bench.MLP(width=32, depth=2),
                       lambda: (torch.randn(8, 32), torch.randint(0, 10, (8,))), bench.F.cross_entropy)
    monkeypatch.setitem(bench.CASES, "mlp", small)
    out = tmp_path / "table.md"
    bench.main(["--quick", "--models", "mlp", "--variants", "plain eager", "fx_spectral eager",
                "--device", "cpu", "--autocast", "bf16", "--markdown", str(out)])
    text = out.read_text()
    assert "autocast bf16" in text and "| MLP 4×512, batch 64 |" in text
    assert "fx_spectral eager ≤ 1.15× plain eager (MLP)" in text and "checked targets met" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_without_a_gpu_fails_clearly(bench, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--device", "cuda", "--quick"])
    assert exc.value.code == 2
    assert "no CUDA device is available" in capsys.readouterr().err


def test_each_compiled_first_call_compiles_its_kernels_cold(bench, tmp_path):
    """_cold_cache: a compile inside it writes its C++ kernel into a fresh directory under the root,
    so the same kernel compiled again in a second cold cache is compiled again, not reused."""
    import torch._dynamo

    x = torch.randn(8)
    kernels = []
    for _ in range(2):
        torch._dynamo.reset()
        before = set(tmp_path.rglob("*.so"))
        with bench._cold_cache(str(tmp_path)):
            assert os.environ["TORCHINDUCTOR_CACHE_DIR"].startswith(str(tmp_path))
            torch.testing.assert_close(torch.compile(lambda t: (t * 3).sin())(x), (x * 3).sin())
        kernels.append(set(tmp_path.rglob("*.so")) - before)
    assert kernels[0] and kernels[1] and not kernels[0] & kernels[1]
    # the same kernel built again (the first cold cache also built inductor's shared helpers)
    assert {p.name for p in kernels[1]} <= {p.name for p in kernels[0]}
    torch._dynamo.reset()
    with bench._cold_cache(None):  # eager variants: nothing changes
        assert not os.environ.get("TORCHINDUCTOR_CACHE_DIR", "").startswith(str(tmp_path))
