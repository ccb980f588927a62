"""TorchTitan's real Trainer with fx_spectral, on CPU with gloo, through the supported entry point
``torchrun -m fx_spectral.integrations.torchtitan.train``.

Every run is a subprocess (torchrun) shared by several checks: the Qwen3 debugmodel with SDPA
attention cut to 2 layers (the config functions below, loaded with ``--module
tests.test_torchtitan_trainer``), seq_len 32, a few steps, TensorBoard on, exact sigma logging.
What is checked comes from what the run wrote: TensorBoard event files, DCP checkpoints, and for
the compile runs the power-iteration buffers each block holds at the end.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Real runs (torchrun subprocesses, ~1-2.5 min each on a loaded 2-core machine): CI runs them.
pytestmark = [pytest.mark.slow, pytest.mark.distributed]

ROOT = Path(__file__).resolve().parents[1]
N_LAYERS = 2
CAP = 1.0
TOL = 1.01  # the promise: exact RMS->RMS sigma <= cap x 1.01 at every step
COMMON = [
    "--training.seq_len", "32",
    "--training.local_batch_size", "2",
    "--metrics.enable_tensorboard",
    "--spectral.log-exact",
    "--spectral.timing_interval", "1",
]  # fmt: skip


# --- config functions (imported by the torchrun workers through --module tests.test_torchtitan_trainer) ---
def _small(config):
    config.model_spec.model.layers = config.model_spec.model.layers[:N_LAYERS]
    return config


def ci_debugmodel():
    """The registry's debugmodel config (SDPA, default [spectral]), 2 layers."""
    from fx_spectral.integrations.torchtitan.config_registry import qwen3_debugmodel_spectral_sdpa

    return _small(qwen3_debugmodel_spectral_sdpa())


def _dump_trainer_config(config):
    # A SpectralTrainer that saves every block's power-iteration buffers (and weights) when it closes.
    from dataclasses import dataclass, fields

    import torch

    from fx_spectral.integrations.torchtitan.state import canonical_name
    from fx_spectral.integrations.torchtitan.trainer import SpectralTrainer

    class DumpTrainer(SpectralTrainer):
        @dataclass(kw_only=True, slots=True)
        class Config(SpectralTrainer.Config):
            pass

        def close(self) -> None:
            out = {}
            for mod_name, mod in self.model_parts[0].named_modules():
                for b_name, buf in mod.named_buffers(recurse=False):
                    if b_name.endswith("_u"):
                        p_name = b_name[:-2]
                        w = getattr(mod, p_name)
                        w = w.full_tensor() if hasattr(w, "full_tensor") else w
                        out[canonical_name(f"{mod_name}.{p_name}")] = {
                            "W": w.detach().float().clone(),
                            "u": buf.detach().float().clone(),
                            "v": getattr(mod, f"{p_name}_v").detach().float().clone(),
                        }
            torch.save(out, os.path.join(self.config.dump_folder, "uv.pt"))
            super().close()

    values = {f.name: getattr(config, f.name) for f in fields(config) if f.init}
    return DumpTrainer.Config(**values)


def ci_debugmodel_dump_uv():
    """As ci_debugmodel (TorchTitan's default selective activation checkpointing); saves u/v at the end."""
    return _dump_trainer_config(ci_debugmodel())


def ci_debugmodel_dump_uv_no_ac():
    """As ci_debugmodel_dump_uv without activation checkpointing."""
    config = ci_debugmodel()
    config.activation_checkpoint = None
    return _dump_trainer_config(config)


# --- running -----------------------------------------------------------------------------------
def _run(dump: Path, *args: str, nproc: int = 1, config: str = "ci_debugmodel", steps: int = 4) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("FX_SPECTRAL_CACHE", str(dump.parent / "cache"))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "fx_spectral.integrations.torchtitan.train",
        "--module", "tests.test_torchtitan_trainer", "--config", config,
        "--dump_folder", str(dump), "--training.steps", str(steps), *COMMON, *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=dump.parent, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    (dump.parent / f"{dump.name}.log").write_text(log)
    assert proc.returncode == 0, f"torchrun exited with {proc.returncode}:\n{log[-6000:]}"
    assert "terminate called" not in log, log[-3000:]
    return log


def _scalars(dump: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(str(dump / "tb" / "**" / "events.out.tfevents.*"), recursive=True)
    assert files, f"no TensorBoard event file under {dump / 'tb'}"
    out: dict[str, dict[int, float]] = {}
    for f in files:
        acc = EventAccumulator(f, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def _model_state(checkpoint: Path) -> dict:
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = checkpoint.parent / f"{checkpoint.name}.pt"
    dcp_to_torch_save(str(checkpoint), str(target))
    state = torch.load(target, weights_only=False)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    pytest.importorskip("torchtitan")
    pytest.importorskip("tensorboard")
    return tmp_path_factory.mktemp("titan")


@pytest.fixture(scope="module")
def one_rank(workdir):
    """1 rank, 4 steps, checkpoints at steps 2 and 4."""
    dump = workdir / "one_rank"
    log = _run(dump, "--checkpoint.enable", "--checkpoint.interval", "2")
    return dump, log, _scalars(dump)


# --- checks ------------------------------------------------------------------------------------
def _check_caps(scalars: dict, steps: int) -> None:
    per_layer = {t: v for t, v in scalars.items() if t.startswith("spectral/sigma/")}
    # 2 layers x (Q, K, V blocks of wqkv, wo, w1, w2, w3)
    assert len(per_layer) == 7 * N_LAYERS, sorted(per_layer)
    for tag, series in per_layer.items():
        assert sorted(series) == list(range(1, steps + 1)), (tag, series)
        for step, sigma in series.items():
            assert 0 < sigma <= CAP * TOL, f"{tag} at step {step}: exact sigma {sigma} > {CAP} x {TOL}"
    assert max(scalars["spectral/sigma_max"].values()) <= CAP * TOL


def _losses(scalars: dict) -> list[float]:
    series = scalars["loss_metrics/global_avg_loss"]
    return [series[s] for s in sorted(series)]


def test_one_rank_keeps_the_cap_logs_and_learns(one_rank):
    dump, log, scalars = one_rank
    assert "TorchTitan workarounds applied" in log
    _check_caps(scalars, 4)
    losses = _losses(scalars)
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    # The projection cost against the optimizer step is logged.
    assert scalars["spectral/projection_ms"] and scalars["spectral/optimizer_step_ms"]


def test_msign_cap_mode_keeps_the_cap_exactly(workdir):
    # --spectral.cap_mode msign: the exact hard cap from float32 matrix products only (no
    # eigendecomposition), in the real Trainer; measured ≤ 1.00004x the cap in float32.
    dump = workdir / "msign"
    log = _run(dump, "--spectral.cap_mode", "msign", steps=3)
    assert "fx_spectral: hard_cap(exact=False, mode='msign') on 14 weight matrices" in log
    scalars = _scalars(dump)
    _check_caps(scalars, 3)
    sigmas = [v for t, s in scalars.items() if t.startswith("spectral/sigma/") for v in s.values()]
    assert max(sigmas) <= CAP * 1.0001, max(sigmas)


def test_resume_from_step_2_gives_the_uninterrupted_run(one_rank, workdir):
    dump, _, scalars = one_rank
    resumed = workdir / "resumed"
    (resumed / "checkpoint").mkdir(parents=True)
    shutil.copytree(dump / "checkpoint" / "step-2", resumed / "checkpoint" / "step-2")
    log = _run(resumed, "--checkpoint.enable", "--checkpoint.interval", "2")
    assert "Training starts at step 3" in log, log[-3000:]
    again = _scalars(resumed)
    assert _losses(again) == _losses(scalars)[2:]
    for tag in (t for t in scalars if t.startswith("spectral/sigma/")):
        assert again[tag] == {s: scalars[tag][s] for s in (3, 4)}, tag
    a = _model_state(dump / "checkpoint" / "step-4")
    b = _model_state(resumed / "checkpoint" / "step-4")
    weights = [k for k in a if k.endswith(".weight")]
    assert weights and a.keys() == b.keys()
    for k in a:
        assert a[k].equal(b[k]), k


def test_two_ranks_fsdp2_keeps_the_cap_and_learns(workdir):
    dump = workdir / "two_ranks"
    log = _run(dump, nproc=2, steps=3)
    assert "fsdp_sum_reduction" in log or "cuda" in log.lower()
    scalars = _scalars(dump)
    _check_caps(scalars, 3)
    losses = _losses(scalars)
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("config", ["ci_debugmodel_dump_uv", "ci_debugmodel_dump_uv_no_ac"])
def test_compile_backend_spectral_gives_every_block_its_own_vectors(workdir, config):
    """--compile.backend spectral: every block's weights get their own u/v, which estimate that
    block's own top singular value (a shared or missing u/v cannot)."""
    import torch

    dump = workdir / config
    _run(dump, "--compile.enable", "--compile.backend", "spectral", config=config, steps=2)
    uv = torch.load(dump / "uv.pt")
    for layer in range(N_LAYERS):
        for name in ("attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"):
            assert f"layers.{layer}.{name}.weight" in uv, f"no u/v for layers.{layer}.{name}: {sorted(uv)[:8]}"
    for name, entry in uv.items():
        W, u, v = entry["W"], entry["u"], entry["v"]
        W2 = W.reshape(W.shape[0], -1)
        sigma = torch.linalg.matrix_norm(W2, ord=2).item()
        estimate = torch.dot(u, W2 @ v).item()
        # u^T W v <= sigma_1 for unit u, v. u/v come from the last step's forward (16 warm-up + 1
        # iteration per forward) while W is dumped after that step's update and cap, so the estimate
        # trails sigma_1 a little (0.89 seen); another block's or a random u/v gives under 0.1 sigma_1.
        assert 0.8 * sigma <= estimate <= sigma * (1 + 1e-4), (name, estimate, sigma)
    for name in ("attention.wo", "feed_forward.w2"):
        u0, u1 = uv[f"layers.0.{name}.weight"]["u"], uv[f"layers.1.{name}.weight"]["u"]
        assert not torch.allclose(u0, u1), f"layers 0 and 1 share the u of {name}"
