"""A quick run of the Lipschitz-transformer demo: outputs written, caps respected, bound certified."""

import dataclasses
import json
import math

import pytest

from fx_spectral.demos import lipschitz as demo

# many tiny ops: a second intra-op thread only adds synchronisation (and crawls on a busy machine)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus():
    return demo.load_stdlib_corpus()


@pytest.fixture(scope="module")
def result(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("demo")
    cfg = demo.DemoConfig(
        steps=6,
        batch_size=4,
        seq_len=16,
        dim=16,
        n_layers=2,
        n_heads=2,
        eval_batches=2,
        log_every=2,
        w_max=1.0,
        w_max_qk=0.8,
        w_max_mlp=1.1,
        w_max_head=2.0,
    )
    metrics = demo.run(cfg, out=out, progress=False, corpus=corpus)
    return cfg, out, metrics


def test_corpus_split_by_file_is_deterministic(corpus):
    train, val, info = corpus
    assert info["train_files"] > 0 and info["val_files"] > 0
    assert int(train.max()) < demo.VOCAB_SIZE and int(train.min()) >= 0
    train2, val2, _ = demo.load_stdlib_corpus()
    assert train2.equal(train) and val2.equal(val)
    # validation is ~10% of the files, never the same text as the start of train
    assert 0.02 < len(val) / (len(train) + len(val)) < 0.3


def test_outputs_written(result):
    _, out, metrics = result
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["models"].keys() == {"constrained", "twin"}
    png = (out / "lipschitz_demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    for m in on_disk["models"].values():
        assert 0 <= m["val_accuracy"] <= 1
        assert math.isfinite(m["val_loss"])
        assert len(m["history"]) == 4  # steps 0, 2, 4 and the last one
        assert set(m["max_activations"]) == {"tok_emb", "layers.0", "layers.1", "lm_head"}


def test_constrained_weights_respect_caps_and_bound(result):
    cfg, _, metrics = result
    c = metrics["models"]["constrained"]
    for name, sigma in c["rms_norms"].items():
        if name.startswith("layers."):
            cap = cfg.w_max_qk if (".wq." in name or ".wk." in name) else cfg.w_max
            cap = cfg.w_max_mlp if ".mlp." in name else cap
            assert sigma <= cap * (1 + 1e-3), name
    # the head has its own Muon and constraint, capped in l2 units (power-iteration estimate: allow 2%)
    assert "lm_head.weight" in c["constrain_report"]
    assert c["bound_terms"]["lm_head"] <= cfg.w_max_head * 1.02
    assert c["lipschitz_bound"] == pytest.approx(math.prod(c["bound_terms"].values()))
    # constrain()'s own report agrees with the exact norms
    for name, sigma in c["rms_norms"].items():
        if name.startswith("layers."):
            assert c["constrain_report"][name]["sigma"] == pytest.approx(sigma, rel=1e-4)
    # the bound the caps allow: attention (1-a) + a*b (its input projected onto the ball of radius
    # sqrt(dim)), MLP (1-a) + a*w^2*1.0000037, head
    a = 1 / (2 * cfg.n_layers)
    r2 = cfg.dim  # radius sqrt(dim)
    dh = cfg.dim // cfg.n_heads
    b = cfg.w_max**2 * (1 + 2 * cfg.w_max_qk**2 * r2 / dh) * math.sqrt(cfg.n_heads)
    allowed = ((1 - a) + a * b) ** cfg.n_layers * ((1 - a) + a * cfg.w_max_mlp**2 * 1.0001) ** cfg.n_layers
    assert c["lipschitz_bound"] <= allowed * cfg.w_max_head * 1.03
    assert metrics["models"]["twin"]["lipschitz_bound"] > 0


def test_cli_arguments(tmp_path, capsys, corpus, monkeypatch):
    monkeypatch.setattr(demo, "load_stdlib_corpus", lambda: corpus)
    status = demo.main(
        [
            "--steps",
            "2",
            "--dim",
            "8",
            "--layers",
            "1",
            "--heads",
            "1",
            "--seq-len",
            "8",
            "--batch-size",
            "2",
            "--w-max",
            "0.5",
            "--method",
            "pure_svd",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert status == 0
    text = capsys.readouterr().out
    assert "certified Lipschitz bound" in text and "validation accuracy" in text
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["method"] == "pure_svd"
    for name, sigma in metrics["models"]["constrained"]["rms_norms"].items():
        if ".attn.wv." in name or ".attn.wo." in name:
            assert sigma <= 0.5 * (1 + 1e-4), name


def test_cli_constrained_only_msign_mode_no_ball(tmp_path, capsys, corpus, monkeypatch):
    monkeypatch.setattr(demo, "load_stdlib_corpus", lambda: corpus)
    args = "--steps 2 --dim 8 --layers 1 --heads 1 --seq-len 8 --batch-size 2 --w-max 0.5 --no-twin"
    status = demo.main([*args.split(), "--cap-mode", "msign", "--attn-ball", "0", "--out", str(tmp_path)])
    assert status == 0 and "twin" not in capsys.readouterr().out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["models"].keys() == {"constrained"}
    assert metrics["config"]["cap_mode"] == "msign" and metrics["config"]["attn_ball"] is None
    for name, sigma in metrics["models"]["constrained"]["rms_norms"].items():
        if ".attn.wv." in name or ".attn.wo." in name:
            assert sigma <= 0.5 * (1 + 1e-4), name


def test_default_is_the_exact_cap_with_the_ball(result):
    cfg, _, metrics = result
    assert cfg.method == "hard_cap" and cfg.cap_mode == "eigh" and cfg.attn_ball == 1.0
    assert cfg.method_options == {"mode": "eigh"}
    assert demo.DemoConfig(method="soft_cap").method_options == {}
    # the twin is the plain architecture; the constrained model's bound uses the ball's radius
    assert metrics["models"]["twin"]["lipschitz_bound"] > metrics["models"]["constrained"]["lipschitz_bound"]


def test_bad_config():
    with pytest.raises(ValueError, match="DemoConfig.attn_ball"):
        demo.DemoConfig(attn_ball=0.0)
    with pytest.raises(ValueError, match="DemoConfig.steps"):
        demo.DemoConfig(steps=0)
    with pytest.raises(ValueError, match="DemoConfig.w_max"):
        demo.DemoConfig(w_max=-1.0)


def test_tradeoff_collect_labels_settings_and_tabulates_gaps(result, tmp_path):
    """benchmarks/lipschitz_tradeoff.py --collect: runs named by the setting their caps match, the
    gap taken per seed against that seed's twin, disagreeing repeats of a run refused."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "lipschitz_tradeoff.py"
    spec = importlib.util.spec_from_file_location("lipschitz_tradeoff", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    _, out, _ = result
    base = json.loads((out / "metrics.json").read_text())
    dirs = []
    for seed, (acc, twin_acc) in enumerate([(0.50, 0.56), (0.52, 0.57)]):
        m = json.loads(json.dumps(base))
        m["config"] = dataclasses.asdict(demo.DemoConfig(seed=seed)) | bench.SETTINGS["mid"]
        m["models"]["constrained"].update(val_accuracy=acc, lipschitz_bound=5.0 + seed)
        m["models"]["twin"]["val_accuracy"] = twin_acc
        d = tmp_path / f"mid{seed}"
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps(m))
        dirs.append(d)
    other = json.loads(json.dumps(base))  # the fixture's own caps: no setting's, labelled by method and caps
    other["config"]["steps"] = 400
    del other["models"]["twin"]  # a --no-twin run
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "metrics.json").write_text(json.dumps(other))

    results = bench.collect([*dirs, dirs[0], tmp_path / "other"])  # an identical repeat is kept once
    settings = [(r["setting"], r["seed"]) for r in results["runs"]]
    assert settings.count(("mid", 0)) == 1 and ("twin", 1) in settings
    assert any(s.startswith("hard_cap/eigh, ball; V/O 1.0") for s, _ in settings)
    rows = bench.summarize(results, min_seeds=2)
    assert [r["setting"] for r in rows] == ["mid"]  # the other run has one seed
    (row,) = rows
    assert row["acc"] == pytest.approx((51.0, 50.0, 52.0))
    assert row["gap"] == pytest.approx((5.5, 5.0, 6.0))  # per seed: 56 - 50, 57 - 52
    assert row["bound"] == pytest.approx((5.5, 5.0, 6.0))
    assert "| mid | 0,1 | 51.00 (50.00-52.00) |" in bench.table(rows)
    bench.plot(results, tmp_path / "t.png", min_seeds=2)
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"

    m = json.loads((dirs[1] / "metrics.json").read_text())
    m["config"]["seed"] = 0  # same setting and seed as dirs[0], another accuracy
    (dirs[1] / "metrics.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="different results"):
        bench.collect(dirs)
