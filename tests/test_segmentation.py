"""The auxiliary segmentation head: config pairing, mask geometry, the mIoU, frozen and adapted runs end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from fmprobe.backbones.base import InputSpec
from fmprobe.config import parse_config
from fmprobe.data.masks import IGNORE, MaskedMediaDataset, collate_with_masks, load_masks
from fmprobe.data.transforms import Preprocess
from fmprobe.errors import ConfigError, ReaderError
from fmprobe.evaluate.results import SegCounts
from fmprobe.evaluate.segmentation import class_iou, iou_counts, location_prior, seed_mean_ci, seg_metrics
from fmprobe.experiments.run import run_experiment
from fmprobe.heads.segmentation import SegDecoder, center_slot, segmentation_loss

CLASSES = ["background", "square"]


def _square_image(size: tuple[int, int], top: int, left: int, side: int, rng: np.random.Generator):
    """A dark noisy image with one bright square, and its 0/1 mask."""
    h, w = size
    mask = np.zeros((h, w), np.uint8)
    mask[top : top + side, left : left + side] = 1
    img = np.clip(rng.normal(40, 10, (h, w, 3)) + 170 * mask[..., None], 0, 255).astype(np.uint8)
    return img, mask


def write_squares(folder: Path, n: int = 48, without_mask: int = 6, seed: int = 0) -> Path:
    """32x32 PNGs with a 16x16 bright square on the 8-pixel patch grid; the first ``without_mask`` rows have
    no mask. The label (binary) is whether the square is in the left half."""
    rng = np.random.default_rng(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        top, left = 8 * int(rng.integers(0, 3)), 8 * int(rng.integers(0, 3))
        img, mask = _square_image((32, 32), top, left, 16, rng)
        Image.fromarray(img).save(folder / "img" / f"{i:03d}.png")
        mask_path = ""
        if i >= without_mask:
            mask_path = f"img/{i:03d}_mask.png"
            Image.fromarray(mask).save(folder / mask_path)
        rows.append({"sample_id": f"s{i:03d}", "path": f"img/{i:03d}.png", "mask": mask_path,
                     "y": int(left < 8), "group": f"g{i // 2:03d}"})
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    return folder / "manifest.csv"


def write_tiny_dinov2(folder: Path) -> Path:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                          patch_size=8, image_size=32)
    Dinov2Model(config).save_pretrained(folder)
    return folder


def seg_config(folder: Path, **sections) -> dict:
    cfg = {
        "name": "seg",
        "data": {"manifest": str(write_squares(folder)), "split_column": None, "mask_column": "mask"},
        "task": {"type": "binary", "targets": ["y"]},
        "model": {"name": str(write_tiny_dinov2(folder / "model")), "layers": [-1], "image_size": 32},
        "features": {"cache_dir": str(folder / "cache"), "batch_size": 16},
        "heads": [{"type": "linear"}],
        "train": {"epochs": 8, "batch_size": 16, "lr": 0.01, "seeds": [0, 1]},
        "split": {"mode": "generate", "fractions": [0.6, 0.2, 0.2]},
        "eval": {"bootstrap": 100},
        "segmentation": {"class_names": CLASSES, "lr": 0.1},
        "runs_dir": str(folder / "runs"),
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


# --- config -------------------------------------------------------------------------------------------


def _minimal(**extra) -> dict:
    return {"name": "x", "data": {"manifest": "m.csv", **extra.pop("data", {})},
            "task": {"type": "binary", "targets": ["y"]}, **extra}


def test_segmentation_and_mask_column_go_together():
    with pytest.raises(ConfigError, match="segmentation: needs data.mask_column"):
        parse_config(_minimal(segmentation={"class_names": CLASSES}))
    with pytest.raises(ConfigError, match="data.mask_column needs a segmentation"):
        parse_config(_minimal(data={"mask_column": "mask"}))
    with pytest.raises(ConfigError, match="segmentation.layer 5 is not among model.layers"):
        parse_config(_minimal(data={"mask_column": "mask"}, segmentation={"class_names": CLASSES, "layer": 5}))
    with pytest.raises(ConfigError, match="segmentation.loss_weight"):
        parse_config(_minimal(data={"mask_column": "mask"}, segmentation={"class_names": CLASSES, "loss_weight": 0}))
    exp = parse_config(_minimal(data={"mask_column": "mask"}, segmentation={"class_names": CLASSES}))
    assert exp.segmentation.loss_weight == 0.5 and exp.segmentation.decoder == "linear"


@pytest.mark.parametrize("change, message", [
    ({"data": {"kind": "volume"}}, "volumes are not supported"),
    ({"data": {"kind": "video", "clip_position": "uniform", "num_clips": 2}}, "clip_position: center"),
    ({"adapt": {"strategy": "lora", "mix": {"mixup_alpha": 0.2}}}, "mixup/CutMix"),
    ({"adapt": {"strategy": "lora", "tta": {"clips": 2}}}, "tta.clips"),
    ({"split": {"mode": "kfold"}}, "kfold"),
    ({"features": {"store_tokens": False}}, "store_tokens"),
])
def test_what_segmentation_cannot_do_honestly_is_refused(change, message):
    from fmprobe.probes.segmentation import check_segmentation

    cfg = _minimal(data={"mask_column": "mask"}, segmentation={"class_names": CLASSES})
    for section, values in change.items():
        cfg.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError, match=message):
        check_segmentation(parse_config(cfg))


def test_manifest_resolves_mask_paths_and_lists_missing_mask_files(tmp_path):
    from fmprobe.config import DataConfig, TaskConfig
    from fmprobe.data.manifest import load_manifest
    from fmprobe.errors import ManifestError

    write_squares(tmp_path, n=4, without_mask=1)
    data = DataConfig(manifest=str(tmp_path / "manifest.csv"), mask_column="mask")
    task = TaskConfig(type="binary", targets=["y"])
    df = load_manifest(data, task).df
    assert pd.isna(df["mask"].iloc[0]) and df["mask"].iloc[1] == str(tmp_path / "img" / "001_mask.png")
    (tmp_path / "img" / "002_mask.png").unlink()
    with pytest.raises(ManifestError, match=r"mask file \('mask'\) not found: 1 row\(s\): row 4 \(id 's002'\)"):
        load_manifest(data, task)


# --- masks and geometry -----------------------------------------------------------------------------------


SPEC = InputSpec(kind="image", image_size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), patch_size=8)


def _dataset(tmp_path: Path, img: np.ndarray, mask: np.ndarray | None, train: bool, seed: int = 0):
    from fmprobe.config import DataConfig

    Image.fromarray(img).save(tmp_path / "a.png")
    mask_path = None
    if mask is not None:
        np.save(tmp_path / "a_mask.npy", mask)
        mask_path = str(tmp_path / "a_mask.npy")
    rows = pd.DataFrame({"sample_id": ["a"], "path": [str(tmp_path / "a.png")], "mask": [mask_path]})
    data = DataConfig(manifest="m.csv", mask_column="mask")
    return MaskedMediaDataset(rows, data, Preprocess(SPEC, data, train=train), num_classes=2, seed=seed)


def test_mask_lands_where_the_square_lands_after_resize_and_crop(tmp_path):
    # 48x64 (H x W) -> shorter side 48 to 32 (x 2/3): 32x43, centre crop drops 5 columns on the left.
    rng = np.random.default_rng(0)
    img, mask = _square_image((48, 64), top=12, left=24, side=24, rng=rng)
    item = _dataset(tmp_path, img, mask, train=False)[0]
    assert item["error"] is None
    got = item["mask"].numpy()
    expected = np.zeros((32, 32), int)
    expected[8:24, 11:27] = 1  # rows 12..36 x 2/3 = 8..24; columns 24..48 x 2/3 - 5 = 11..27
    assert (got != expected).sum() <= 32  # only boundary pixels may differ (nearest sampling)
    assert got[10:22, 13:25].all() and not got[:6].any() and not got[:, :9].any()


@pytest.mark.parametrize("seed", range(6))
def test_mask_follows_random_crop_and_flip(tmp_path, seed):
    rng = np.random.default_rng(seed)
    img, mask = _square_image((40, 56), top=4, left=30, side=20, rng=rng)  # off-centre: a flip moves it
    item = _dataset(tmp_path, img, mask, train=True, seed=seed)[0]
    bright = (item["pixels"][0, 0].mean(0) > 0).numpy()  # normalised: the square is well above 0
    got = item["mask"].numpy().astype(bool)
    iou = (bright & got).sum() / (bright | got).sum()
    assert iou > 0.85


def test_mask_of_another_size_names_the_sample_and_both_shapes(tmp_path):
    img, _ = _square_image((32, 32), 0, 0, 8, np.random.default_rng(0))
    item = _dataset(tmp_path, img, np.zeros((30, 32), np.int64), train=False)[0]
    assert "sample 'a'" in item["error"] and "30x32" in item["error"] and "32x32" in item["error"]
    rows = pd.DataFrame({"sample_id": ["a"], "path": [str(tmp_path / "a.png")], "mask": [str(tmp_path / "a_mask.npy")]})
    from fmprobe.config import DataConfig

    with pytest.raises(ReaderError, match="30x32"):
        load_masks(rows, DataConfig(manifest="m.csv", mask_column="mask"), SPEC, 2)


def test_mask_values_outside_the_classes_are_refused(tmp_path):
    img, mask = _square_image((32, 32), 0, 0, 8, np.random.default_rng(0))
    item = _dataset(tmp_path, img, mask * 3, train=False)[0]
    assert "outside 0..1" in item["error"] and "[3]" in item["error"]


def test_rows_without_mask_are_ignored_in_the_batch_and_the_loss(tmp_path):
    img, mask = _square_image((32, 32), 8, 8, 16, np.random.default_rng(0))
    with_mask = _dataset(tmp_path, img, mask, train=False)[0]
    without = {**with_mask, "index": 1, "sample_id": "b", "mask": None}
    batch = collate_with_masks([with_mask, without])
    assert (batch["mask"][1] == IGNORE).all() and (batch["mask"][0] >= 0).all()
    logits = torch.randn(2, 2, 32, 32, requires_grad=True)
    loss = segmentation_loss(logits, batch["mask"])
    loss.backward()
    assert logits.grad[1].abs().sum() == 0 and logits.grad[0].abs().sum() > 0
    # changing the unmasked row's prediction leaves the loss unchanged; a batch with no mask gives 0
    other = logits.detach().clone()
    other[1] = torch.randn(2, 32, 32)
    assert segmentation_loss(other, batch["mask"]) == pytest.approx(loss.item())
    assert segmentation_loss(other, torch.full((2, 32, 32), IGNORE)).item() == 0.0


def test_center_slot_picks_the_center_frame():
    assert center_slot(1, 1) == 0  # image
    assert center_slot(16, 16) == 8  # image encoder on a 16-frame clip: frame 8
    assert center_slot(8, 16) == 4  # tubelet 2: frames 8-9
    assert center_slot(1, 16) == 0  # temporal_pool


def test_decoders_output_mask_size():
    tokens = torch.randn(3, 4, 4, 16)
    for kind in ("linear", "conv"):
        dec = SegDecoder(16, 5, kind, (32, 32), np.zeros(16), np.ones(16))
        assert dec(tokens).shape == (3, 5, 32, 32)


# --- mIoU ---------------------------------------------------------------------------------------------


def test_miou_equals_brute_force_and_sklearn():
    from sklearn.metrics import jaccard_score

    rng = np.random.default_rng(0)
    k = 4
    true = rng.integers(0, k, (5, 6, 7))
    pred = np.where(rng.random(true.shape) < 0.6, true, rng.integers(0, k, true.shape))
    pred[pred == 3] = 2  # class 3 never predicted; still present in truth
    inter, union = iou_counts(pred, true, k)
    brute = [((pred == c) & (true == c)).sum() / ((pred == c) | (true == c)).sum() for c in range(k)]
    np.testing.assert_allclose(class_iou(inter, union), brute)
    ref = jaccard_score(true.ravel(), pred.ravel(), average=None, labels=list(range(k)))
    np.testing.assert_allclose(class_iou(inter, union), ref)
    m = seg_metrics(inter, union, ["bg", "a", "b", "c"])
    assert m["miou"] == pytest.approx(np.mean(ref[1:]))  # background not in the mean
    assert m["iou/bg"] == pytest.approx(ref[0])
    # bootstrap weights: a resample equals the metric on the repeated samples
    w = np.array([[2.0, 0, 1, 1, 1]])
    idx = np.repeat(np.arange(5), w[0].astype(int))
    np.testing.assert_allclose(class_iou(inter, union, w)[0],
                               jaccard_score(true[idx].ravel(), pred[idx].ravel(), average=None, labels=list(range(k))))
    ci = seed_mean_ci([SegCounts([str(i) for i in range(5)], inter, union)], ["bg", "a", "b", "c"],
                      groups=None, n_resamples=200, ci=0.9)
    point, lo, hi = ci["miou"]
    assert point == pytest.approx(m["miou"]) and lo < point < hi


def test_location_prior_is_each_pixels_most_frequent_training_class():
    masks = np.zeros((5, 4, 4), np.uint8)
    masks[:3, :2, :2] = 1  # 3 of 5 masks: class 1 in the top-left corner
    masks[:2, 3, 3] = 2  # 2 of 5: not a majority
    prior = location_prior(masks, 3)
    expected = np.zeros((4, 4), int)
    expected[:2, :2] = 1
    np.testing.assert_array_equal(prior, expected)


# --- end to end ---------------------------------------------------------------------------------------


def test_frozen_run_reports_miou_above_the_prior(tmp_path):
    exp = parse_config(seg_config(tmp_path))
    result = run_experiment(exp, progress=False)
    seg = result.metrics["segmentation"]
    block = seg["decoders"]["segmentation"]
    test = block["splits"]["test"]
    assert seg["path"] == "frozen" and "foreground" in seg["miou_definition"]
    assert seg["n_with_mask"]["train"] + seg["n_with_mask"]["val"] + seg["n_with_mask"]["test"] == 48 - 6
    assert len(test["per_seed"]["miou"]) == 2
    assert test["mean"]["miou"] > 0.6
    assert test["mean"]["miou"] > seg["baseline"]["test"]["miou"] + 0.3
    lo, hi = block["test_ci"]["miou"]
    assert lo <= test["mean"]["miou"] <= hi
    assert set(test["mean"]) == {"miou", "iou/background", "iou/square"}
    saved = json.loads((result.run_dir / "metrics.json").read_text())
    assert saved["segmentation"]["decoders"]["segmentation"]["splits"]["test"]["mean"]["miou"] == test["mean"]["miou"]
    assert "mIoU" in (result.run_dir / "report.html").read_text()
    masks = np.load(result.run_dir / "segmentation_test_masks.npz")
    assert masks["segmentation"].shape == (seg["n_with_mask"]["test"], 32, 32)
    assert (result.run_dir / "checkpoints/segmentation/seed1/best.pt").exists()


def test_no_train_mask_is_a_clear_error(tmp_path):
    cfg = seg_config(tmp_path)
    manifest = pd.read_csv(cfg["data"]["manifest"], dtype=str, keep_default_na=False)
    manifest["mask"] = ""
    manifest.to_csv(cfg["data"]["manifest"], index=False)
    with pytest.raises(ConfigError, match="no train sample has a mask in column 'mask'"):
        run_experiment(parse_config(cfg), progress=False)


def test_adapted_lora_run_trains_the_decoder_jointly(tmp_path):
    cfg = seg_config(tmp_path, train={"epochs": 3, "seeds": [0]},
                     adapt={"strategy": "lora", "lora": {"rank": 2}, "adapters": {"lr": 0.01}})
    result = run_experiment(parse_config(cfg), progress=False)
    m = result.metrics
    seg = m["segmentation"]
    assert seg["path"] == "adapted" and seg["loss_weight"] == 0.5 and "jointly" in seg["trained"]
    entry = m["heads"]["linear"]["segmentation"]  # beside the head's own metrics
    assert entry == seg["decoders"]["linear"]
    assert 0 <= entry["splits"]["test"]["mean"]["miou"] <= 1
    groups = json.loads((result.run_dir / "adaptation.json").read_text())["heads"]["linear"]["0"]["param_groups"]
    assert any(g["name"].startswith("segmentation/") and g["base_lr"] == 0.1 for g in groups)
    curves = pd.read_parquet(result.run_dir / "curves.parquet")
    assert curves["train_seg_loss"].notna().all() and len(curves) == 3
    assert (result.run_dir / "segmentation_curves.parquet").exists()


def test_segmentation_loss_reaches_decoder_and_lora_but_not_frozen_weights(tmp_path):
    from fmprobe.adapt.multitask import MultiTaskModel
    from fmprobe.adapt.setup import prepare
    from fmprobe.backbones.registry import load_encoder
    from fmprobe.heads import build_head

    cfg = seg_config(tmp_path, adapt={"strategy": "lora", "lora": {"rank": 2}})
    exp = parse_config(cfg)
    encoder = load_encoder(exp.model)
    head = build_head(exp.heads[0], 16, 1)
    prepared = prepare(exp, encoder, head, exp.heads[0], steps_per_epoch=1)
    decoder = SegDecoder(16, 2, "conv", (32, 32), np.zeros(16), np.ones(16))
    model = MultiTaskModel(encoder, head, layer=-1, pooling="mean", features=exp.features, standardise=None,
                           decoder=decoder, seg_layer=-1, frames=1)
    pixels = torch.randn(3, 1, 1, 3, 32, 32)
    mask = torch.randint(0, 2, (3, 32, 32))
    mask[2] = IGNORE  # a row without mask
    model(pixels)
    segmentation_loss(model.seg_logits, mask).backward()  # the segmentation term alone
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in decoder.parameters())
    lora = [(n, p) for n, p in encoder.named_parameters() if "lora_" in n]
    assert lora and any(p.grad is not None and p.grad.abs().sum() > 0 for _, p in lora)
    frozen = [p for n, p in encoder.named_parameters() if "lora_" not in n]
    assert frozen and all(p.grad is None for p in frozen)
    assert all(p.grad is None for p in head.parameters())  # the main head is not in the segmentation term
    assert prepared.peft_model is not None


def test_decoder_accumulation_equals_the_larger_batch(tmp_path):
    """train.grad_accum is honoured by the frozen decoder: batches of 8 accumulated in pairs follow the same
    trajectory as batches of 16 (the same permutation, every pixel labelled), and differ from unaccumulated 8s."""
    from fmprobe.probes.segmentation import MaskSet, fit_decoder

    rng = np.random.default_rng(0)
    n, d = {"train": 32, "val": 8, "test": 8}, 16
    x = {s: rng.normal(size=(k, 2, 2, d)).astype(np.float16) for s, k in n.items()}  # [n, h, w, D] tokens
    masks = MaskSet(ids={s: [f"{s}{i}" for i in range(k)] for s, k in n.items()},
                    masks={s: rng.integers(0, 2, (k, 8, 8)).astype(np.uint8) for s, k in n.items()},
                    rows={s: pd.DataFrame() for s in n})  # fmt: skip

    def weights(batch_size: int, grad_accum: int) -> dict[str, torch.Tensor]:
        base = parse_config(seg_config(tmp_path / f"b{batch_size}a{grad_accum}"))
        exp = base.model_copy(update={"train": base.train.model_copy(
            update={"batch_size": batch_size, "grad_accum": grad_accum, "epochs": 2, "early_stopping": None})})
        _, decoder = fit_decoder(exp, x, masks, 0, mean=np.zeros(d), std=np.ones(d), out_size=(8, 8),
                                 checkpoint_dir=None)  # fmt: skip
        return decoder.state_dict()

    accumulated, large, small = weights(8, 2), weights(16, 1), weights(8, 1)
    assert all(torch.allclose(accumulated[k], large[k], atol=1e-6) for k in large)
    assert any(not torch.allclose(small[k], large[k], atol=1e-4) for k in large)
