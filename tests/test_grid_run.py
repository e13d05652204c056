"""`train.grid` through `fmprobe run`: members trained in HeadBanks, the head reported is the member with the best
mean validation score over seeds (never test), and every head reports trainable / total parameters."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fmprobe.config import HeadConfig, parse_config
from fmprobe.errors import ConfigError
from fmprobe.evaluate.results import HeadRun, ProbeResults, SplitData
from fmprobe.evaluate.task import ResolvedTask
from fmprobe.probes.grid import check_grid, select_members
from fmprobe.experiments.run import run_experiment
from fmprobe.heads import build_head
from run_factories import base_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return base_config(tmp_path_factory.mktemp("grid"))


def _run(cfg, **train):
    exp = parse_config({**cfg, "train": {**cfg["train"], **train}})
    result = run_experiment(exp, progress=False)
    return exp, result.run_dir, json.loads((result.run_dir / "metrics.json").read_text())


def test_one_member_grid_equals_the_plain_run_and_counts_parameters(tiny, monkeypatch):
    exp, _, plain = _run(tiny)
    _, run_dir, grid = _run(tiny, grid={"lr": [tiny["train"]["lr"]]})
    a, b = plain["heads"]["linear"], grid["heads"]["linear"]
    assert a["selected_epochs"] == b["selected_epochs"]
    for split in ("train", "val", "test"):
        for metric, values in a["splits"][split]["per_seed"].items():
            np.testing.assert_allclose(b["splits"][split]["per_seed"][metric], values, atol=1e-5, err_msg=metric)
    member = f"linear/lr{tiny['train']['lr']:g}/wd{exp.train.weight_decay:g}"
    assert grid["selection"]["grid"]["heads"]["linear"]["chosen"] == member
    assert (run_dir / "checkpoints" / member / "seed1" / "best.pt").exists()
    # parameters: the head trained, and the backbone it sits on
    from fmprobe.backbones.registry import load_encoder

    backbone = sum(p.numel() for p in load_encoder(exp.model).parameters())
    head = sum(p.numel() for p in build_head(HeadConfig(type="linear"), 16, 1).parameters())
    for m in (plain, grid):
        assert m["heads"]["linear"]["trainable_params"] == head
        assert m["heads"]["linear"]["total_params"] == backbone + head
    assert f"{head} / {backbone + head:,}" in (run_dir / "report.html").read_text()
    # the backbone count is remembered: a cached run does not load the model to count again
    import fmprobe.backbones.registry as registry

    monkeypatch.setattr(registry, "load_encoder", lambda model: pytest.fail("loaded the backbone again"))
    assert _run(tiny)[2]["heads"]["linear"]["total_params"] == backbone + head


def test_grid_run_reports_the_member_best_on_mean_validation(tiny):
    _, run_dir, metrics = _run(tiny, grid={"lr": [1e-4, 0.01, 0.3], "weight_decay": [0.0, 0.1]})
    grid = metrics["selection"]["grid"]["heads"]["linear"]
    assert len(grid["members"]) == 6
    for entry in grid["members"]:
        assert entry["val_mean"] == pytest.approx(np.mean(list(entry["val_per_seed"].values())))
        assert (run_dir / "checkpoints" / entry["member"] / "seed0" / "last.pt").exists()
    best = max(grid["members"], key=lambda e: e["val_mean"])
    assert grid["chosen"] == best["member"] and (grid["lr"], grid["weight_decay"]) == (best["lr"], best["weight_decay"])
    head = metrics["heads"]["linear"]
    assert head["splits"]["val"]["per_seed"]["auroc"] == pytest.approx(list(best["val_per_seed"].values()))
    assert list(metrics["heads"]) == ["linear"] and metrics["selection"]["best_head"] == "linear"
    assert 'id="grid"' in (run_dir / "report.html").read_text()


def _member_run(head, seed, val, test):
    """A run whose val/test AUROC is exactly ``val`` / ``test`` (0.5 or 1.0): scores perfect or constant."""
    y = np.array([0, 1, 0, 1])
    scores = {s: (y * 0.8 + 0.1 if v == 1.0 else np.full(4, 0.5))
              for s, v in (("train", 1.0), ("val", val), ("test", test))}
    return HeadRun(head=head, seed=seed, best_epoch=1, best_val_score=val, stopped_early=False, curves=[],
                   scores=scores, thresholds=[0.5], loss_info={}, trainable_params=3)  # fmt: skip


def test_selection_uses_the_validation_mean_over_seeds_never_test(tiny):
    exp = parse_config({**tiny, "train": {**tiny["train"], "seeds": [0, 1, 2],
                                          "grid": {"lr": [0.001, 0.01, 0.1], "weight_decay": [0.0]}}})
    a, b, c = "linear/lr0.001/wd0", "linear/lr0.01/wd0", "linear/lr0.1/wd0"
    runs = [
        # a: best on validation for seed 0 (and 2) alone — per-seed selection would pick it for those seeds
        _member_run(a, 0, 1.0, 0.5), _member_run(a, 1, 0.5, 0.5), _member_run(a, 2, 0.5, 0.5),
        # b: the best validation mean (2 of 3 seeds perfect)
        _member_run(b, 0, 0.5, 0.5), _member_run(b, 1, 1.0, 0.5), _member_run(b, 2, 1.0, 0.5),
        # c: perfect on test, poor on validation
        _member_run(c, 0, 0.5, 1.0), _member_run(c, 1, 0.5, 1.0), _member_run(c, 2, 0.5, 1.0),
    ]
    y = np.array([0, 1, 0, 1])
    split = SplitData(ids={s: ["1", "2", "3", "4"] for s in ("train", "val", "test")},
                      groups={s: ["1", "2", "3", "4"] for s in ("train", "val", "test")},
                      targets={s: y for s in ("train", "val", "test")})  # fmt: skip
    selected, record = select_members(exp, ResolvedTask.from_config(exp.task, None), ProbeResults(runs=runs), split)
    assert record["heads"]["linear"]["chosen"] == b
    assert [r.seed for r in selected.runs] == [0, 1, 2] and {r.head for r in selected.runs} == {"linear"}
    assert [r.best_val_score for r in selected.runs] == [0.5, 1.0, 1.0]
    means = {e["member"]: e["val_mean"] for e in record["heads"]["linear"]["members"]}
    assert means == pytest.approx({a: 2 / 3, b: 5 / 6, c: 0.5})


def test_grid_is_refused_for_adapted_runs(tiny):
    exp = parse_config({**tiny, "train": {**tiny["train"], "grid": {"lr": [0.01]}}, "adapt": {"strategy": "lora"}})
    with pytest.raises(ConfigError, match="train.grid"):
        check_grid(exp)
