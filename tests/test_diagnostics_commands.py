"""The diagnostics commands end to end: align, attention (backbone and attentive probe), spatial."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy.spatial.distance import pdist, squareform
from scipy.stats import kendalltau, spearmanr
from sklearn.neighbors import NearestNeighbors
from typer.testing import CliRunner

from fmprobe.cli import app
from fmprobe.diagnostics.alignment import knn_recall, linear_r2, mutual_knn, rbf_cka, rsa

runner = CliRunner()


def _cli(*args: str) -> tuple[int, str]:
    """Exit code and stdout (the JSON); on failure stdout plus stderr, to show the error."""
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout if result.exit_code == 0 else result.output


def _write_config(config: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


# ---------------------------------------------------------------------------------------------- references
# Written straight from the papers' formulas with explicit matrices, independently of fmprobe's code.


def _centering(n: int) -> np.ndarray:
    return np.eye(n) - np.ones((n, n)) / n


def ref_cka(k: np.ndarray, l: np.ndarray) -> float:
    h = _centering(len(k))
    hsic = lambda a, b: np.trace(a @ h @ b @ h)  # noqa: E731
    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def ref_rbf(x: np.ndarray) -> np.ndarray:
    sigma = np.median(pdist(x))
    return np.exp(-squareform(pdist(x, "sqeuclidean")) / (2 * sigma**2))


def ref_hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float:
    n = len(k)
    kt, lt = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
    one = np.ones(n)
    return (np.trace(kt @ lt) + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * one @ kt @ lt @ one) / (n * (n - 3))


def ref_mutual_knn(a: np.ndarray, b: np.ndarray, k: int) -> float:
    sets = []
    for x in (a, b):
        idx = NearestNeighbors(n_neighbors=k + 1, metric="cosine").fit(x).kneighbors(x, return_distance=False)
        sets.append([set(row[row != i][:k]) for i, row in enumerate(idx)])
    return float(np.mean([len(sa & sb) / k for sa, sb in zip(*sets)]))


def test_align_npy_matches_reference_formulas(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(60, 12)) * np.linspace(0.5, 3, 12)
    b = np.tanh(a @ rng.normal(size=(12, 9))) + 0.3 * rng.normal(size=(60, 9))
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b.astype(np.float32))  # a float32 file is compared in float64
    b = b.astype(np.float32).astype(np.float64)
    code, output = _cli("align", tmp_path / "a.npy", tmp_path / "b.npy", "--out", tmp_path / "out")
    assert code == 0, output
    got = json.loads(output)["metrics"]
    assert set(got) >= {"linear_cka", "rbf_cka", "debiased_cka", "mutual_knn", "rsa", "linear_r2"}

    ka, kb = a @ a.T, b @ b.T
    assert got["linear_cka"] == pytest.approx(ref_cka(ka, kb), abs=1e-9)  # float64 all the way through
    assert got["rbf_cka"] == pytest.approx(ref_cka(ref_rbf(a), ref_rbf(b)), abs=1e-4)
    ac, bc = a - a.mean(0), b - b.mean(0)
    kc, lc = ac @ ac.T, bc @ bc.T
    expected = ref_hsic_unbiased(kc, lc) / np.sqrt(ref_hsic_unbiased(kc, kc) * ref_hsic_unbiased(lc, lc))
    assert got["debiased_cka"] == pytest.approx(expected, abs=1e-4)
    assert got["mutual_knn"] == pytest.approx(ref_mutual_knn(a, b, 10), abs=1e-4)
    assert got["rsa"] == pytest.approx(spearmanr(pdist(a, "correlation"), pdist(b, "correlation")).statistic, abs=1e-4)
    saved = json.loads((tmp_path / "out" / "alignment.json").read_text())
    assert saved["metrics"] == got and (tmp_path / "out" / "alignment.png").stat().st_size > 0


def test_align_records_its_conventions_and_the_cli_sets_each(tmp_path):
    rng = np.random.default_rng(3)
    a = rng.normal(size=(50, 6))
    b = np.tanh(a @ rng.normal(size=(6, 4))) + 0.4 * rng.normal(size=(50, 4))
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    code, output = _cli("align", tmp_path / "a.npy", tmp_path / "b.npy", "--out", tmp_path / "default")
    assert code == 0, output
    recorded = json.loads((tmp_path / "default" / "alignment.json").read_text())["conventions"]
    assert {k: v for k, v in recorded.items() if k != "explained"} == {
        "knn_k": 10, "knn_metric": "cosine", "rbf_sigma_factor": 1.0, "rbf_median": "distinct-pairs",
        "rsa_dissimilarity": "correlation", "rsa_rank_correlation": "spearman", "r2_test_fraction": 0.2}
    assert set(recorded["explained"]) == {"mutual_knn, knn_recall", "rbf_cka, debiased_rbf_cka", "rsa", "linear_r2"}

    code, output = _cli("align", tmp_path / "a.npy", tmp_path / "b.npy", "--out", tmp_path / "set", "--knn-k", "3",
                        "--knn-metric", "euclidean", "--rbf-sigma-factor", "0.4", "--rbf-median", "full-matrix",
                        "--rsa-dissimilarity", "euclidean", "--rsa-rank-correlation", "kendall",
                        "--r2-test-fraction", "0.3", "--seed", "1")
    assert code == 0, output
    result = json.loads(output)
    got = result["metrics"]
    assert got["mutual_knn"] == mutual_knn(a, b, k=3, metric="euclidean")
    assert got["knn_recall"] == knn_recall(a, b, k=3, metric="euclidean")
    assert got["rbf_cka"] == rbf_cka(a, b, 0.4, "full-matrix")
    assert got["rsa"] == pytest.approx(kendalltau(pdist(a), pdist(b)).statistic, abs=1e-12)
    assert got["rsa"] == rsa(a, b, "euclidean", "kendall")
    assert got["linear_r2"] == linear_r2(a, b, seed=1, test_size=0.3)
    assert result["conventions"]["knn_k"] == 3 and result["conventions"]["rbf_median"] == "full-matrix"
    assert "sigma = 0.4 x the square root of the median squared Euclidean distance over the full N x N matrix" in (
        result["conventions"]["explained"]["rbf_cka, debiased_rbf_cka"])
    assert json.loads((tmp_path / "set" / "alignment.json").read_text())["conventions"] == result["conventions"]

    code, output = _cli("align", tmp_path / "a.npy", tmp_path / "b.npy", "--rbf-median", "mean", "--out", tmp_path)
    assert code == 2 and "rbf_median (--rbf-median) must be one of distinct-pairs, full-matrix" in output


def test_align_refuses_mismatched_rows_and_unknown_metrics(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((5, 3)))
    np.save(tmp_path / "b.npy", np.zeros((6, 3)))
    code, output = _cli("align", tmp_path / "a.npy", tmp_path / "b.npy", "--out", tmp_path)
    assert code == 2 and "5 rows" in output and "6" in output
    code, output = _cli("align", tmp_path / "a.npy", tmp_path / "a.npy", "--metric", "cka", "--out", tmp_path)
    assert code == 2 and "unknown alignment metric" in output
    code, output = _cli("align", tmp_path / "missing.yaml:-1", tmp_path / "a.npy")
    assert code == 2 and "no such file" in output


def test_align_cached_feature_sets_by_config_and_store(tmp_path, toy_study):
    from fmprobe.config import parse_config
    from fmprobe.data.manifest import load_manifest
    from fmprobe.features.extract import extract_features

    cfg = toy_study("binary", n=24, model={"layers": [0, -1]})
    path = _write_config(cfg, tmp_path / "exp.yaml")
    code, output = _cli("align", path, path, "--metric", "linear_cka", "--metric", "rsa", "--out", tmp_path / "m")
    assert code == 0, output
    result = json.loads(output)
    matrix = np.array(result["matrices"]["linear_cka"]["values"])
    assert result["matrices"]["linear_cka"]["rows"] == ["0", "-1"] and matrix.shape == (2, 2)
    np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-9)
    np.testing.assert_allclose(matrix, matrix.T, atol=1e-9)
    assert (tmp_path / "m" / "alignment_linear_cka.png").exists() and (tmp_path / "m" / "alignment_rsa.png").exists()

    exp = parse_config(cfg)
    features = extract_features(exp, load_manifest(exp.data, exp.task), progress=False)
    pooled = features.pooled("0", "cls").astype(np.float64)
    np.save(tmp_path / "cls0.npy", pooled)
    code, output = _cli("align", f"{features.store_dir}:0:cls", tmp_path / "cls0.npy", "--metric", "linear_cka",
                        "--out", tmp_path / "s")
    assert code == 0, output
    result = json.loads(output)
    assert result["samples"] == 24 and result["metrics"]["linear_cka"] == pytest.approx(1.0, abs=1e-12)
    # rows are matched by sample id: a reordered/partial store side still lines up with the config side
    code, output = _cli("align", f"{path}:-1", f"{features.store_dir}:-1", "--metric", "linear_cka", "--out", tmp_path)
    assert code == 0 and json.loads(output)["metrics"]["linear_cka"] == pytest.approx(1.0, abs=1e-12)


# ---------------------------------------------------------------------------------------------- attention


def test_backbone_attention_entropy_matches_the_hf_model(tmp_path, toy_study, tiny_dinov2_dir):
    from transformers import Dinov2Model

    from fmprobe.config import parse_config
    from fmprobe.data.dataset import MediaDataset
    from fmprobe.data.manifest import load_manifest
    from fmprobe.data.transforms import Preprocess

    cfg = toy_study("binary", n=12)
    path = _write_config(cfg, tmp_path / "exp.yaml")
    code, output = _cli("attention", path, "--samples", "3", "--out", tmp_path / "att")
    assert code == 0, output
    result = json.loads(output)
    assert len(result["samples"]) == 3 and result["blocks"] == ["0", "1"] and result["heads"] == 2

    exp = parse_config(cfg)
    manifest = load_manifest(exp.data, exp.task)
    model = Dinov2Model.from_pretrained(tiny_dinov2_dir, attn_implementation="eager").eval()
    spec_size = model.config.image_size
    from fmprobe.backbones.base import InputSpec

    spec = InputSpec(kind="image", image_size=(spec_size, spec_size), mean=(0.485, 0.456, 0.406),
                     std=(0.229, 0.224, 0.225), patch_size=8)
    data = MediaDataset(manifest.df.head(3), exp.data, Preprocess(spec, exp.data))
    pixels = torch.stack([data[i]["pixels"][0, 0] for i in range(3)])
    with torch.no_grad():
        maps = model(pixel_values=pixels, output_attentions=True).attentions
    expected = []
    for a in maps:
        p = a.double().numpy()
        h = -(p * np.log(np.where(p > 0, p, 1))).sum(-1) / np.log(p.shape[-1])  # [B, heads, Q]
        expected.append(h.mean(axis=(0, 2)))
    np.testing.assert_allclose(result["entropy"]["per_block_head"], expected, atol=1e-6)
    groups = result["by_group"]["last_block"]
    assert set(groups) <= {"0", "1"} and sum(g["n"] for g in groups.values()) == 3
    for sid in result["samples"]:
        assert (tmp_path / "att" / f"attention_{sid}.png").stat().st_size > 0
    assert "every block" in result["rollout"]


def test_attention_of_a_runs_attentive_probe(tmp_path, toy_study):
    from fmprobe.config import parse_config
    from fmprobe.experiments.run import run_experiment

    cfg = toy_study("multiclass", n=45, n_classes=3, heads=[{"type": "attentive", "pooling": "attentive",
                                                              "num_heads": 2, "query_per_class": True}],
                    train={"epochs": 3}, eval={"bootstrap": 20})
    run = run_experiment(parse_config(cfg), progress=False)
    code, output = _cli("attention", "--run", run.run_dir)
    assert code == 0, output
    head = json.loads(output)["heads"]["attentive"]
    test_n = run.metrics["split"]["sizes"]["test"]
    assert head["queries"] == ["0", "1", "2"] and np.array(head["entropy_per_head_query"]).shape == (2, 3)
    assert set(head["entropy_per_seed"]) == {"0", "1"}
    assert sum(g["n"] for g in head["by_group"]["per_sample_mean"].values()) == test_n
    assert 0 < head["entropy_mean"] <= 1
    assert (run.run_dir / "attention" / "pooler_attentive_maps.png").exists()
    code, output = _cli("attention")
    assert code == 2 and "either" in output


def test_attention_of_an_adapted_run_rebuilds_each_seed_and_compares_the_backbone_before_and_after(tmp_path,
                                                                                                  toy_study):
    """attention --run on a LoRA run read best.pt as a bare head and crashed (state-dict keys): the adapted model
    is rebuilt as training built it, its predictions are the run's, and the backbone's entropy is reported
    before and after adaptation."""
    import pandas as pd

    from fmprobe.adapt.lora import load_adapter
    from fmprobe.backbones.registry import load_encoder
    from fmprobe.config import parse_config
    from fmprobe.data.dataset import MediaDataset
    from fmprobe.data.transforms import Preprocess
    from fmprobe.diagnostics.adapted_attention import backbone_entropy, rebuild
    from fmprobe.experiments.run import run_experiment

    head = {"type": "attentive", "pooling": "attentive", "num_heads": 2}
    cfg = toy_study("binary", n=36, heads=[head], train={"epochs": 2, "seeds": [0, 1]}, eval={"bootstrap": 20},
                    adapt={"strategy": "lora", "lora": {"rank": 2}, "adapters": {"lr": 0.05}})
    run = run_experiment(parse_config(cfg), progress=False)
    code, output = _cli("attention", "--run", run.run_dir, "--samples", "3")
    assert code == 0, output
    result = json.loads(output)
    assert result == json.loads((run.run_dir / "attention" / "attention.json").read_text())
    backbone = result["backbone"]
    assert backbone["blocks"] == ["0", "1"] and len(backbone["samples"]) == 3
    before = np.array(backbone["before"]["per_block_head"])
    assert before.shape == (2, 2) and ((before > 0) & (before <= 1)).all()
    assert set(backbone["after"]) == {"attentive/seed0", "attentive/seed1"}
    pooled = result["heads"]["attentive"]
    assert np.array(pooled["entropy_per_head_query"]).shape == (2, 1) and set(pooled["entropy_per_seed"]) == {"0", "1"}

    # independently: the saved peft adapter of seed 1 in a fresh encoder gives the same "after" entropy
    exp = parse_config(cfg)
    rows = pd.read_csv(exp.data.manifest).set_index("sample_id").loc[backbone["samples"]].reset_index()
    rows["path"] = [str(Path(exp.data.manifest).parent / p) for p in rows["path"]]
    encoder = load_encoder(exp.model)
    data = MediaDataset(rows, exp.data, Preprocess(encoder.input_spec, exp.data, train=False))
    np.testing.assert_allclose(backbone_entropy(encoder, data, [0, 1, 2]).summary()["per_block_head"], before)
    info = json.loads((run.run_dir / "adaptation.json").read_text())["heads"]["attentive"]["1"]
    load_adapter(encoder, run.run_dir / info["adapter_dir"])
    after = backbone_entropy(encoder, data, [0, 1, 2]).summary()["per_block_head"]
    np.testing.assert_allclose(after, backbone["after"]["attentive/seed1"]["per_block_head"], atol=1e-9)
    assert not np.allclose(after, before, atol=1e-7)  # the adapters moved the attention, however little

    # the rebuilt model of seed 0 predicts the run's test scores
    preds = pd.read_parquet(run.run_dir / "predictions.parquet").query("split == 'test' and seed == 0")
    test = pd.read_csv(exp.data.manifest).set_index("sample_id").loc[preds["sample_id"]].reset_index()
    test["path"] = [str(Path(exp.data.manifest).parent / p) for p in test["path"]]
    pretrained = load_encoder(exp.model)
    test_data = MediaDataset(test, exp.data, Preprocess(pretrained.input_spec, exp.data, train=False))
    model = rebuild(exp, pretrained, run.run_dir, exp.heads[0], 0, 1, test_data)
    with torch.no_grad():
        scores = torch.sigmoid(model(torch.stack([test_data[i]["pixels"] for i in range(len(test))]))[:, 0])
    np.testing.assert_allclose(scores.numpy(), preds["p/y"].to_numpy(), atol=1e-5)


def test_attention_of_a_staged_partial_run_reports_the_backbone_before_and_after(tmp_path, toy_study):
    from fmprobe.config import parse_config
    from fmprobe.experiments.run import run_experiment

    cfg = toy_study("binary", n=36, train={"epochs": 2, "seeds": [0]}, eval={"bootstrap": 20},
                    adapt={"strategy": "staged", "unfreeze": "partial", "partial_blocks": 1,
                           "stage2": {"epochs": 1, "backbone": {"lr": 0.01}}})
    run = run_experiment(parse_config(cfg), progress=False)
    code, output = _cli("attention", "--run", run.run_dir, "--samples", "2")
    assert code == 0, output
    backbone = json.loads(output)["backbone"]
    before = np.array(backbone["before"]["per_block_head"])
    after = np.array(backbone["after"]["linear/seed0"]["per_block_head"])
    assert before.shape == after.shape == (2, 2)
    np.testing.assert_allclose(after[0], before[0])  # block 0 stayed frozen: its attention is unchanged
    assert not np.allclose(after[1], before[1], atol=1e-7)  # the trained last block attends differently
    assert backbone["change"]["after_minus_before"] == pytest.approx(after.mean() - before.mean())


# ---------------------------------------------------------------------------------------------- spatial


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=48,
                           window_size=56, fullatt_block_indexes=[1], patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        text_config=dict(vocab_size=1000, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, bos_token_id=1, eos_token_id=2,
                         rope_parameters={"rope_type": "default", "mrope_section": [4, 4, 4], "rope_theta": 1e4}),
        image_token_id=900, video_token_id=901, vision_start_token_id=902, vision_end_token_id=903,
    )
    path = tmp_path_factory.mktemp("qwen")
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(path)
    return path


def test_spatial_on_a_tiny_qwen_vision_blocks_merger_and_lm_layer(tmp_path, tiny_qwen):
    code, output = _cli("spatial", "--encoder", tiny_qwen, "--layers", "0,visual.merger,model.language_model.layers.0",
                        "--image-size", "56", "--n-train", "6", "--n-test", "2", "--steps", "5", "--out", tmp_path)
    assert code == 0, output
    result = json.loads((tmp_path / "spatial.json").read_text())
    rows = {r["layer"]: r for r in result["results"]}
    assert rows["0"]["grid"] == [1, 4, 4] and rows["0"]["dim"] == 32
    assert rows["visual.merger"]["grid"] == [1, 2, 2] and rows["visual.merger"]["dim"] == 48
    assert rows["model.language_model.layers.0"]["grid"] == [1, 2, 2]
    for r in rows.values():
        assert 0 <= r["mask_iou"] <= 1 and 0 <= r["box_iou"] <= 1 and r["n_test_images"] == 2
    assert "visual.merger" in output


def test_spatial_pixel_control_beats_random_tokens(tmp_path):
    from fmprobe.diagnostics.spatial_run import spatial_command

    kwargs = dict(n_train=24, n_test=8, steps=40, image_size=64)  # small; 96/32/300 at 112 px: 0.62 vs 0.00
    pixel = spatial_command("pixel", out=tmp_path / "p", **kwargs)["results"][0]
    random = spatial_command("random", out=tmp_path / "r", **kwargs)["results"][0]
    assert pixel["mask_iou"] > random["mask_iou"] + 0.1
    assert pixel["mask_iou"] > pixel["mask_iou_prior"]
    code, output = _cli("spatial", "--encoder", "pixel", "--layers", "3", "--out", tmp_path)
    assert code == 2 and "one extraction point" in output
