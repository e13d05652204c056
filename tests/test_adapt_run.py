"""End-to-end adaptation through `run_experiment` on tiny real backbones: LoRA (DINOv2 images, V-JEPA 2 clips),
staged from stage 1's best, and every regulariser at once."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest
import torch
from adapt_factories import vjepa2_model
from torch.utils.data import DataLoader

from fmprobe.adapt.lora import load_adapter
from fmprobe.adapt.model import AdaptModel, Standardise
from fmprobe.backbones.registry import load_encoder
from fmprobe.config import parse_config
from fmprobe.data.dataset import MediaDataset, collate_samples
from fmprobe.data.transforms import Preprocess
from fmprobe.experiments.run import run_experiment
from fmprobe.heads import build_head

FAST = {"epochs": 3, "batch_size": 16, "lr": 0.01, "seeds": [0]}


def test_lora_run_reports_parameters_and_its_saved_adapter_reproduces_the_predictions(toy_study):
    exp = parse_config(toy_study("binary", n=60, train={**FAST, "epochs": 6},
                                 adapt={"strategy": "lora", "lora": {"rank": 2, "merge": True},
                                        "adapters": {"lr": 0.01}}))  # fmt: skip
    result = run_experiment(exp, progress=False)
    run_dir = result.run_dir
    info = json.loads((run_dir / "adaptation.json").read_text())["heads"]["linear"]["0"]
    head_params = 32 + 1
    lora_params = 2 * 2 * (32 * 2 + 2 * 32)  # blocks x (q, v) x (A + B)
    assert info["trainable_params"] == head_params + lora_params == result.metrics["heads"]["linear"]["trainable_params"]
    assert info["total_params"] > 10 * info["trainable_params"] and info["merged"]
    assert info["lora_targets"] == [f"encoder.layer.{i}.attention.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    assert result.metrics["heads"]["linear"]["splits"]["train"]["mean"]["auroc"] > 0.75  # it learns

    # The adapter alone (+ the head checkpoint) rebuilds the model that made the predictions.
    encoder = load_encoder(exp.model)
    load_adapter(encoder, run_dir / info["adapter_dir"])
    best = torch.load(run_dir / "checkpoints/linear/seed0/best.pt", weights_only=True)
    head = build_head(exp.heads[0], 32, 1)
    head.load_state_dict({k[len("head."):]: v for k, v in best.items() if k.startswith("head.")})
    standardise = Standardise(best["standardise.mean"].numpy(), best["standardise.std"].numpy())
    model = AdaptModel(encoder, head, layer=-1, pooling="mean", features=exp.features, standardise=standardise).eval()
    preds = pd.read_parquet(run_dir / "predictions.parquet")
    test = preds[preds["split"] == "test"]
    manifest = pd.read_csv(exp.data.manifest)
    rows = manifest.set_index("sample_id").loc[test["sample_id"]].reset_index()
    rows["path"] = [str(Path(exp.data.manifest).parent / p) for p in rows["path"]]
    data = MediaDataset(rows, exp.data, Preprocess(encoder.input_spec, exp.data, train=False))
    batch = next(iter(DataLoader(data, batch_size=len(rows), collate_fn=collate_samples)))
    with torch.no_grad():
        scores = torch.sigmoid(model(batch["pixels"])[:, 0]).numpy()
    np.testing.assert_allclose(scores, test["p/y"].to_numpy(), atol=1e-5)


def test_staged_stage_two_starts_from_stage_one_best(toy_study):
    """With stage-2 learning rates ~0 the model stays at stage 1's best head: its predictions are the frozen
    path's, and its curves continue stage 1's."""
    base = toy_study("multiclass", n=60, n_classes=3, train={**FAST, "epochs": 4, "seeds": [0, 1]})
    frozen = run_experiment(parse_config(base), progress=False)
    tiny = {"lr": 1e-12}
    staged_cfg = {**base, "adapt": {"strategy": "staged", "unfreeze": "partial", "partial_blocks": 1,
                                    "stage2": {"epochs": 1, "head": tiny, "backbone": tiny}}}  # fmt: skip
    staged = run_experiment(parse_config(staged_cfg), progress=False)
    a = pd.read_parquet(frozen.run_dir / "predictions.parquet").sort_values(["seed", "split", "sample_id"])
    b = pd.read_parquet(staged.run_dir / "predictions.parquet").sort_values(["seed", "split", "sample_id"])
    cols = [c for c in a.columns if c.startswith("p/")]
    assert len(a) == len(b) and len(cols) == 3
    np.testing.assert_allclose(b[cols].to_numpy(), a[cols].to_numpy(), atol=1e-4)
    curves = pd.read_parquet(staged.run_dir / "curves.parquet")
    seed0 = curves[curves["seed"] == 0]
    assert list(seed0["stage"]) == [1] * 4 + [2] and list(seed0["epoch"]) == [1, 2, 3, 4, 5]
    assert (staged.run_dir / "checkpoints/stage1/linear/seed0/best.pt").exists()


def test_everything_on_partial_run_completes(toy_study):
    adapt = {"strategy": "partial", "partial_blocks": 1, "unfreeze_at_epoch": 2, "layer_decay": 0.7,
             "modules": {"embeddings": {"lr": 1e-4}}, "mix": {"mixup_alpha": 0.4, "cutmix_alpha": 1.0},
             "tta": {"hflip": True}, "drop_path": 0.1, "gradient_checkpointing": True,
             "backbone": {"lr": 1e-3, "warmup_epochs": 1}}  # fmt: skip
    exp = parse_config(toy_study("multiclass", n=60, n_classes=3, weights=[0.6, 0.2, 0.2],
                                 train={**FAST, "grad_accum": 2, "balanced_sampler": True}, adapt=adapt,
                                 loss={"label_smoothing": 0.1}))  # fmt: skip
    result = run_experiment(exp, progress=False)
    info = json.loads((result.run_dir / "adaptation.json").read_text())["heads"]["linear"]["0"]
    kinds = {g["name"].split("/")[0] for g in info["param_groups"]}
    assert kinds == {"head", "backbone", "module:embeddings"}
    assert info["partial_modules"] == ["encoder.layer.1", "layernorm"]
    assert {g["start_step"] for g in info["param_groups"] if not g["name"].startswith("head")} == {2}  # 60*0.7/16/2
    assert 0 <= result.metrics["heads"]["linear"]["splits"]["test"]["mean"]["balanced_accuracy"] <= 1


def write_videos(folder, n):
    """Clips of 4 frames whose brightness carries the label."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        label = i % 2
        path = folder / f"v{i:03d}.mp4"
        with av.open(str(path), "w") as container:
            stream = container.add_stream("mpeg4", rate=8)
            stream.width = stream.height = 32
            stream.pix_fmt = "yuv420p"
            for f in range(4):
                arr = np.full((32, 32, 3), 40 + 120 * label + 5 * f + (i % 7), dtype=np.uint8)
                for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        rows.append({"sample_id": f"v{i:03d}", "path": str(path), "y": label, "group": f"g{i // 2}"})
    return pd.DataFrame(rows)


def test_lora_on_a_tiny_vjepa2_video_task(tmp_path):
    vjepa2_model().save_pretrained(tmp_path / "model")
    write_videos(tmp_path / "videos", 24).to_csv(tmp_path / "manifest.csv", index=False)
    exp = parse_config({
        "name": "video", "data": {"manifest": str(tmp_path / "manifest.csv"), "kind": "video", "frames_per_clip": 4,
                                  "split_column": None},
        "task": {"type": "binary", "targets": ["y"]}, "model": {"name": str(tmp_path / "model")},
        "features": {"cache_dir": str(tmp_path / "cache")}, "train": {**FAST, "batch_size": 8},
        "split": {"mode": "generate", "fractions": [0.5, 0.25, 0.25]}, "eval": {"bootstrap": 50},
        "adapt": {"strategy": "lora", "lora": {"rank": 2, "targets": "qkv"}}, "runs_dir": str(tmp_path / "runs"),
    })  # fmt: skip
    result = run_experiment(exp, progress=False)
    info = json.loads((result.run_dir / "adaptation.json").read_text())["heads"]["linear"]["0"]
    assert all(t.startswith("encoder.layer.") for t in info["lora_targets"]) and len(info["lora_targets"]) == 6
    assert info["trainable_params"] == 17 + 6 * (16 * 2 + 2 * 16)
    test = result.metrics["heads"]["linear"]["splits"]["test"]["mean"]
    assert set(test) >= {"auroc", "ap"} and 0 <= test["auroc"] <= 1
    assert (result.run_dir / info["adapter_dir"] / "adapter_model.safetensors").exists()


def _staged_regression(toy_study, name, augment):
    config = toy_study("regression", n=60, name=name, train={"epochs": 6, "batch_size": 16, "lr": 0.01, "seeds": [0]},
                       data={"augment": augment},
                       adapt={"strategy": "staged", "unfreeze": "partial", "partial_blocks": 1,
                              "stage2": {"epochs": 2, "head": {"lr": 1e-4}, "backbone": {"lr": 1e-6}}})
    result = run_experiment(parse_config(config), progress=False)
    curves = pd.read_parquet(result.run_dir / "curves.parquet")
    stage1 = curves[curves["stage"] == 1].set_index("epoch")
    best1 = int(stage1["val_r2"].idxmax())  # stage 2 starts from stage 1's best epoch
    first2 = curves[curves["stage"] == 2].iloc[0]
    return result, stage1.loc[best1, "train_loss"], first2["train_loss"]


def test_stage_two_training_loss_continues_stage_one_without_augmentation(toy_study):
    """Stage 1 trains on cached features of un-augmented inputs, stage 2 on augmented pixels: the jump in training
    loss at the boundary is the augmentation (recorded in metrics.json and explained in the report), not the
    optimiser or the schedule. With data.augment off, stage 2 continues where stage 1 ended."""
    result, end1, start2 = _staged_regression(toy_study, "augmented", {"crop_scale": 1.14, "hflip": True})
    inputs = result.metrics["training_inputs"]
    assert [s["stage"] for s in inputs["stages"]] == [1, 2]
    assert inputs["stages"][0]["inputs"].startswith("cached features of the un-augmented inputs")
    assert inputs["stages"][1]["augmentation"] == {"crop_scale": 1.14, "hflip": True}
    assert any("training loss can jump at the stage boundary" in n for n in inputs["curve_notes"])
    assert any("1 − R²" in n for n in inputs["curve_notes"])
    assert "what each stage trained on" in (result.run_dir / "report.html").read_text()
    jump = start2 / end1

    result, end1, start2 = _staged_regression(toy_study, "plain", {"crop_scale": 1.0, "hflip": False})
    plain = result.metrics["training_inputs"]
    assert plain["stages"][1]["augmentation"] == {"crop_scale": 1.0, "hflip": False}
    print(f"stage-2 / stage-1 training loss: {jump:.2f} with augmentation, {start2 / end1:.3f} without")
    assert start2 == pytest.approx(end1, rel=0.05)  # the same inputs, the same head: the curve goes on
    assert jump > 1.2 and not any("jump" in n for n in plain["curve_notes"])


def test_train_r2_curve_is_the_r2_of_the_training_outputs(toy_study):
    """train_r2 is scored on the outputs of each training epoch: for one z-scored target under MSE it equals
    1 - train_loss (the mean squared error over a pass over every training sample), which is what R² is there."""
    config = toy_study("regression", n=60, name="r2", train={"epochs": 4, "batch_size": 16, "lr": 0.01, "seeds": [0]})
    result = run_experiment(parse_config(config), progress=False)
    curves = pd.read_parquet(result.run_dir / "curves.parquet")
    np.testing.assert_allclose(curves["train_r2"], 1 - curves["train_loss"], atol=1e-4)
