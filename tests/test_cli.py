"""The command line and the eager spectral-norm demo it runs."""

from __future__ import annotations

import io
import math
import re
import subprocess
import sys

import pytest
import torch

from fx_spectral import cli, is_spectral_normalized
from fx_spectral.demos import sn_mlp

_FLOAT = r"([0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?)"


@pytest.fixture(scope="module")
def demo_output() -> str:
    out = io.StringIO()
    sys_stdout, sys.stdout = sys.stdout, out
    try:
        status = cli.main(["sn-demo", "--steps", "30", "--no-progress"])
    finally:
        sys.stdout = sys_stdout
    assert status == 0
    return out.getvalue()


def _layer_rows(text: str) -> list[list[float]]:
    # "  0 | plain before, after | SN before: ||W||, sigma_hat, ||W/s|| | SN after: ||W||, sigma_hat, ||W/s||"
    rows = []
    for line in text.splitlines():
        num = r"\s+([0-9.]+)"
        m = re.fullmatch(r"\s*\d+ \|" + num * 2 + r" \|" + num * 3 + r" \|" + num * 3, line)
        if m:
            rows.append([float(g) for g in m.groups()])
    return rows


def _bounds(text: str, who: str) -> tuple[float, float]:
    m = re.search(who + r":\s+upper bound\s+" + _FLOAT + r"\s+lower bound\s+" + _FLOAT, text)
    assert m, f"no bound line for {who!r} in:\n{text}"
    return float(m.group(1)), float(m.group(2))


def test_demo_prints_per_layer_sigmas(demo_output):
    rows = _layer_rows(demo_output)
    assert len(rows) == 4, demo_output  # 3 hidden Linear layers + the output Linear
    for row in rows:
        plain_before, plain_after, sn_w_before, sn_s_before, sn_eff_before, sn_w_after, sn_s_after, sn_eff_after = row
        assert sn_w_before == pytest.approx(plain_before)  # same initial weights
        # sigma_hat = u^T W v never exceeds ||W||, and after 15 warm-up iterations it is close to it.
        assert sn_s_before <= sn_w_before * 1.0001 and sn_s_after <= sn_w_after * 1.0001
        assert sn_s_after == pytest.approx(sn_w_after, rel=0.02)
        # So each normalized layer's true norm ||W / sigma_hat|| is 1, or a little above.
        assert 0.9999 <= sn_eff_before <= 1.05 and 0.9999 <= sn_eff_after <= 1.05
        assert plain_after > 0


def test_demo_lipschitz_bounds(demo_output):
    sn_upper, sn_lower = _bounds(demo_output, "spectral-normalized")
    plain_upper, plain_lower = _bounds(demo_output, "plain twin")
    assert sn_upper <= 1.05**4
    assert plain_upper > 2 * sn_upper  # the twin's bound is not controlled
    assert sn_lower <= sn_upper * 1.001 and plain_lower <= plain_upper * 1.001  # a lower bound stays below
    accuracies = [float(a) for a in re.findall(r":\s+" + _FLOAT + "%", demo_output)]
    assert len(accuracies) == 2 and all(0 <= a <= 100 for a in accuracies)
    assert accuracies[0] > 55  # the plain twin learns something in 30 steps


def test_demo_numbers_match_the_trained_models():
    # The reported numbers against torch's own computation on the networks the demo trained.
    threads = torch.get_num_threads()
    result = sn_mlp.run(steps=5, width=16, depth=2, num_threads=1, progress=False, out=io.StringIO())
    assert torch.get_num_threads() == threads  # the demo restores torch's thread setting
    plain_linears = [m for m in result.plain_model if isinstance(m, torch.nn.Linear)]
    sn_linears = [m for m in result.sn_model if isinstance(m, torch.nn.Linear)]
    assert len(result.layers) == len(plain_linears) == len(sn_linears) == 3
    for layer, plain, sn in zip(result.layers, plain_linears, sn_linears):
        assert is_spectral_normalized(sn) and not is_spectral_normalized(plain)
        true_plain = torch.linalg.matrix_norm(plain.weight.detach(), ord=2).item()
        true_sn = torch.linalg.matrix_norm(sn.weight.detach(), ord=2).item()
        assert layer.plain_after == pytest.approx(true_plain, rel=1e-5)
        assert layer.sn_raw_after == pytest.approx(true_sn, rel=1e-5)
        # The eval forward computes with W / sigma_hat: check it against F.linear with that weight.
        x = torch.randn(7, sn.in_features)
        w_bar = sn.weight.detach() / layer.sn_sigma_after
        torch.testing.assert_close(sn(x), torch.nn.functional.linear(x, w_bar, sn.bias), rtol=1e-5, atol=1e-6)
        assert layer.sn_effective_after == pytest.approx(torch.linalg.matrix_norm(w_bar, ord=2).item(), rel=1e-5)
    assert result.sn_bound == pytest.approx(math.prod(r.sn_effective_after for r in result.layers), rel=1e-9)
    # The empirical lower bound is a real Jacobian norm: check one point with autograd's jacobian.
    point = torch.tensor([0.3, -0.2])
    jac = torch.autograd.functional.jacobian(result.sn_model, point)
    assert torch.linalg.matrix_norm(jac, ord=2).item() <= result.sn_bound * 1.0001


def test_demo_rejects_bad_steps():
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        sn_mlp.run(steps=0, progress=False, out=io.StringIO())
    with pytest.raises(ValueError, match="num_threads must be >= 1"):
        sn_mlp.run(steps=1, num_threads=0, progress=False, out=io.StringIO())


def test_demo_is_the_default_command():
    parser = cli.build_parser()
    args = parser.parse_args(["demo", "--steps", "3"])
    assert args.steps == 3 and callable(args._run)
    with pytest.raises(SystemExit):
        parser.parse_args(["no-such-command"])


@pytest.mark.parametrize("argv", [
    ["demo", "--steps", "0"],
    ["demo", "--method", "bogus"],
    ["demo", "--dim", "-3"],
    ["demo", "--threads", "-1"],
    ["sn-demo", "--steps", "0"],
    ["sn-demo", "--width", "x"],
    ["sn-demo", "--threads", "0"],
], ids=lambda a: "_".join(a).replace("-", ""))
def test_invalid_arguments_are_usage_errors(argv, capsys):
    """Refused before any work starts: argparse's usage line and exit status 2, no traceback."""
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: fx-spectral " + argv[0]) and "error:" in err, err
    assert argv[1] in err  # the message names the option


def test_help_and_version_import_no_torch():
    """`fx-spectral --help` answers without importing torch or any subcommand module."""
    code = (
        "import sys\n"
        "from fx_spectral import cli\n"
        "for argv in (['--help'], ['--version']):\n"
        "    try:\n"
        "        cli.main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, e.code\n"
        "heavy = [m for m in sys.modules if m == 'torch' or m.startswith('fx_spectral.demos')]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "sn-demo" in proc.stdout and "fx_spectral 0.1.0" in proc.stdout


def test_python_dash_m_help():
    proc = subprocess.run(
        [sys.executable, "-m", "fx_spectral", "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "demo" in proc.stdout and "sn-demo" in proc.stdout
