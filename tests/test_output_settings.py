"""What a run says before and about its settings: a warning, with the setting that helps, when small images are
enlarged a lot for the model; the report's config shows only what applied and the loss in words; loading a model
does not draw transformers' bars and leaves the caller's tqdm hook as it was."""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from fmprobe.backbones.base import InputSpec
from fmprobe.config import parse_config
from fmprobe.data.manifest import load_manifest
from fmprobe.experiments.advice import upsampling_warning
from fmprobe.report.config_view import applied_config, loss_text

SPEC = InputSpec(kind="image", image_size=(224, 224), mean=(0.5,) * 3, std=(0.5,) * 3, patch_size=14)


def _study(tmp_path, side: int) -> tuple:
    rows = []
    for i in range(6):
        Image.fromarray(np.full((side, side), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
        rows.append({"sample_id": f"s{i}", "path": f"{i}.png", "y": i % 2})
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    exp = parse_config({"name": "x", "data": {"manifest": str(tmp_path / "m.csv"), "group_column": None,
                                              "split_column": None},
                        "task": {"type": "binary", "targets": ["y"]}})  # fmt: skip
    return exp, load_manifest(exp.data, exp.task)


def test_small_images_enlarged_for_the_model_are_warned_about_with_the_size_to_set(tmp_path):
    exp, manifest = _study(tmp_path, 8)  # digits-sized images into a 224-px model
    warning = upsampling_warning(exp, manifest, SPEC)
    assert warning is not None and "8x8 px" in warning and "28x per side" in warning
    assert "256 tokens per image where 4 would" in warning and "model.image_size: 28" in warning
    assert upsampling_warning(exp, manifest, None) is None  # input unknown without loading the model: no guess


def test_images_near_the_model_size_are_not_warned_about(tmp_path):
    exp, manifest = _study(tmp_path, 112)  # 2x: the demo's 64 px into 112 px is of this kind
    assert upsampling_warning(exp, manifest, SPEC) is None


def _exp(**adapt):
    return parse_config({"name": "x", "data": {"manifest": "m.csv"}, "task": {"type": "multilabel",
                         "targets": ["a", "b"]}, "adapt": adapt, "loss": {"type": "bce"}})  # fmt: skip


def test_the_report_config_leaves_out_settings_the_run_never_read():
    frozen = applied_config(_exp())
    assert "strategy: frozen" in frozen
    assert all(key not in frozen for key in ("lora", "stage2", "frames_per_clip", "focal_gamma", "tracking",
                                             "checkpoint", "native_frames"))  # fmt: skip
    lora = applied_config(_exp(strategy="lora"))
    assert "lora:" in lora and "rank: 8" in lora and "stage2" not in lora and "partial_blocks" not in lora
    partial = applied_config(_exp(strategy="partial"))
    assert "partial_blocks: 2" in partial and "lora" not in partial


def test_loss_settings_read_as_words_with_rounded_named_weights():
    metrics = {"task": {"type": "multilabel", "targets": ["grey_matter", "white_matter"], "class_names": None}}
    info = {"type": "bce", "class_weights": {"negative": [0.6666666666666666, 0.5714285714285714],
                                             "positive": [2.0000000000000004, 4.0]},
            "pos_weight": None, "label_smoothing": 0.0}  # fmt: skip
    assert loss_text(info, metrics) == ("BCE · class weights negative: grey_matter 0.667, white_matter 0.571; "
                                        "positive: grey_matter 2, white_matter 4")  # fmt: skip



def test_a_fitted_heads_loss_record_reads_as_the_values_it_chose_among():
    metrics = {"task": {"type": "binary", "targets": ["y"], "class_names": None}}
    knn = {"type": "none", "fit": "k-nearest neighbours", "k": [10, 20, 50], "temperature": 0.07}
    logreg = {"type": "log loss", "fit": "L-BFGS", "C": [0.0001, 0.01, 1.0], "class_weights": "none"}
    assert loss_text(knn, metrics) == "fit k-nearest neighbours · k tried 10, 20, 50 · temperature 0.07"
    assert loss_text(logreg, metrics) == "LOG LOSS · fit L-BFGS · C tried 0.0001, 0.01, 1"

def test_loading_a_model_draws_no_transformers_bar_and_restores_the_tqdm_hook(tiny_dinov2_dir, capfd):
    from transformers.utils import logging as hf_logging

    from fmprobe.backbones.registry import load_encoder
    from fmprobe.config import ModelConfig

    def mine(factory, args, kwargs):  # a hook of the caller's own
        return factory(*args, **kwargs)

    previous = hf_logging.set_tqdm_hook(mine)
    try:
        capfd.readouterr()
        load_encoder(ModelConfig(name=str(tiny_dinov2_dir)))
        out, err = capfd.readouterr()
        assert "Loading weights" not in out + err
        assert hf_logging._tqdm_hook is mine
    finally:
        hf_logging.set_tqdm_hook(previous)
