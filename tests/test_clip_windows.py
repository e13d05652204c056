"""data.clip_start_column: a window per manifest row inside a long video, frame folder or slice stack.

Windows are frame-exact (also when the reader seeks to a keyframe), never shifted or padded (errors name the
sample, file, start, window and length), bad starts are manifest errors listing rows, options that cannot apply
are config errors, and two windows of one file are two samples in the feature cache.
"""

from __future__ import annotations

import types
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from data_factories import write_image
from torch import nn

from fmprobe.backbones.base import Encoder, EncoderOutput, InputSpec
from fmprobe.config import DataConfig, TaskConfig, parse_config
from fmprobe.data.dataset import MediaDataset
from fmprobe.data.manifest import load_manifest
from fmprobe.data.readers import read_media
from fmprobe.data.readers import video as video_reader
from fmprobe.data.readers.clips import clip_indices
from fmprobe.data.readers.source import Source
from fmprobe.data.transforms import Preprocess
from fmprobe.errors import ConfigError, ManifestError, ReaderError
from fmprobe.features.extract import run_extraction

SIZE, BLOCK = 64, 16  # frame i shows the bits of i as 16 black/white blocks: survives lossy coding exactly


def frame_pattern(i: int) -> np.ndarray:
    frame = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    for bit in range(16):
        if i >> bit & 1:
            r, c = divmod(bit, 4)
            frame[r * BLOCK : (r + 1) * BLOCK, c * BLOCK : (c + 1) * BLOCK] = 255
    return frame


def frame_index(frame: np.ndarray) -> int:
    """Which frame an ``[C, H, W]`` or ``[H, W, C]`` frame is, read back from its blocks."""
    hwc = frame if frame.shape[-1] == 3 else frame.transpose(1, 2, 0)
    centres = hwc[BLOCK // 2 :: BLOCK, BLOCK // 2 :: BLOCK].astype(float).mean(-1).ravel()
    return int(sum(1 << bit for bit, v in enumerate(centres) if v > 128))


def write_long_video(path: Path, n: int, codec: str = "mpeg4", gop: int = 12, b_frames: int = 2) -> str:
    """``n`` frames, a keyframe every ``gop`` frames, B-frames (decode order differs from display order)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = gop
        stream.codec_context.max_b_frames = b_frames
        for i in range(n):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame_pattern(i), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def decode_all(path: str) -> list[np.ndarray]:
    with av.open(path) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def cfg(kind: str = "video", **kw) -> DataConfig:
    return DataConfig(manifest="m.csv", kind=kind, clip_start_column="clip_start", **kw)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, tuple[str, list[np.ndarray]]]:
    folder = tmp_path_factory.mktemp("videos")
    out = {}
    for name, codec, ext in (("mpeg4", "mpeg4", "mp4"), ("h264", "libx264", "mp4"), ("vp9", "libvpx-vp9", "webm")):
        path = write_long_video(folder / f"{name}.{ext}", 150, codec, b_frames=0 if name == "vp9" else 2)
        out[name] = (path, decode_all(path))
    return out


# --- frame-exact windows -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mpeg4", "h264", "vp9"])
@pytest.mark.parametrize("start", [0, 11, 12, 13, 70, 137])  # first frame, around a keyframe, deep, the last fit
def test_window_is_frame_exact_against_decoding_everything(videos, name, start, monkeypatch):
    path, everything = videos[name]
    assert [frame_index(f) for f in everything] == list(range(150))  # the pattern survives the codec
    monkeypatch.setattr(video_reader, "_decode_in_order", None)  # the seeking path alone
    out = read_media(path, cfg(frames_per_clip=5, frame_step=3), sample_id="s", clip_start=start)
    assert out.shape == (1, 5, 3, SIZE, SIZE) and out.dtype == np.uint8
    want = np.stack([everything[start + 3 * t] for t in range(5)]).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(out[0], want)  # the same pixels as decoding from frame 0


def test_a_late_window_decodes_from_its_keyframe_not_from_frame_zero(videos):
    path, everything = videos["h264"]
    src = Source.from_url(path, "s")
    decoded = []

    class Counting:  # the container, counting what the decoder outputs
        def __init__(self, container):
            self.container, self.streams = container, container.streams

        def seek(self, *args, **kwargs):
            return self.container.seek(*args, **kwargs)

        def decode(self, *args, **kwargs):
            for frame in self.container.decode(*args, **kwargs):
                decoded.append(frame.pts)
                yield frame

    with src.open() as f, av.open(f) as container:
        table = video_reader.frame_table(container, src)
        assert table.n == 150 and table.keys is not None and len(table.keys) == 13  # a keyframe every 12 frames
        idx = np.array([[130, 132, 134]])
        frames = video_reader._seek_decode(Counting(container), table, idx)
    assert sorted(frames) == [130, 132, 134]
    assert [frame_index(frames[i]) for i in (130, 132, 134)] == [130, 132, 134]
    assert len(decoded) <= 12 + 5  # from the keyframe at 120, not 135 frames from the start


def test_without_timestamps_the_reader_decodes_from_the_start_with_the_same_frames(videos, monkeypatch):
    path, _ = videos["mpeg4"]
    data = cfg(frames_per_clip=4, frame_step=2)
    seeking = read_media(path, data, sample_id="s", clip_start=40)
    monkeypatch.setattr(video_reader, "_cached_table", lambda c, src: video_reader.FrameTable(150, None, None))
    in_order = read_media(path, data, sample_id="s", clip_start=40)
    np.testing.assert_array_equal(seeking, in_order)
    assert [frame_index(f) for f in in_order[0]] == [40, 42, 44, 46]


def test_center_and_uniform_clips_of_a_long_video_are_exact_too(videos):
    path, everything = videos["mpeg4"]
    data = DataConfig(manifest="m.csv", kind="video", frames_per_clip=3, frame_step=5, clip_position="uniform",
                      num_clips=3)  # fmt: skip
    out = read_media(path, data, sample_id="s")
    idx = clip_indices(150, data)
    assert idx[1, 0] > 12 and [[frame_index(f) for f in clip] for clip in out] == idx.tolist()
    np.testing.assert_array_equal(out, np.stack([everything[i] for i in idx.ravel()]).reshape(3, 3, SIZE, SIZE, 3)
                                  .transpose(0, 1, 4, 2, 3))  # fmt: skip


def test_frame_folder_and_volume_windows(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(30):
        write_image(folder / f"frame_{i}.png", np.full((6, 7), i, dtype=np.uint8))
    out = read_media(str(folder), cfg(frames_per_clip=4, frame_step=2), sample_id="f", clip_start=21)
    assert out[0, :, 0, 0, 0].tolist() == [21, 23, 25, 27]
    vol = np.broadcast_to(np.arange(40, dtype=np.float32), (5, 6, 40)).copy()  # slice i holds i
    np.save(tmp_path / "v.npy", vol)
    out = read_media(str(tmp_path / "v.npy"), cfg("volume", frames_per_clip=3, frame_step=4), sample_id="v",
                     clip_start=10)  # fmt: skip
    assert out.shape == (1, 3, 1, 5, 6) and out[0, :, 0, 0, 0].tolist() == [10, 14, 18]


# --- errors --------------------------------------------------------------------------------------------


def test_a_window_past_the_end_is_an_error_naming_everything(videos, tmp_path):
    path, _ = videos["mpeg4"]
    data = cfg(frames_per_clip=5, frame_step=3)  # spans 13 frames: the last start that fits is 137
    with pytest.raises(ReaderError) as err:
        read_media(path, data, sample_id="clip7", clip_start=138)
    message = str(err.value)
    for part in ("sample 'clip7'", "mpeg4.mp4", "clip start 138", "138..150", "runs past the end", "150 frames"):
        assert part in message, (part, message)
    with pytest.raises(ReaderError, match=r"clip start 500: .*500\.\.512.* is beyond the end; the video has 150"):
        read_media(path, data, sample_id="clip8", clip_start=500)
    np.save(tmp_path / "v.npy", np.zeros((4, 4, 10), dtype=np.float32))
    with pytest.raises(ReaderError, match=r"sample 'v', file '.*v.npy': clip start 8: .*8\.\.10.*10 slices"):
        read_media(str(tmp_path / "v.npy"), cfg("volume", frames_per_clip=3), sample_id="v", clip_start=8)


def test_missing_and_empty_videos_are_named_errors(tmp_path):
    with pytest.raises(ReaderError, match=r"sample 'm', file '.*gone.mp4': file not found"):
        read_media(str(tmp_path / "gone.mp4"), cfg(), sample_id="m", clip_start=0)
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(ReaderError, match=r"sample 'e', file '.*empty.mp4': file is empty"):
        read_media(str(tmp_path / "empty.mp4"), cfg(), sample_id="e", clip_start=0)


def _manifest(tmp_path: Path, starts: list[str], path: str) -> DataConfig:
    rows = [{"sample_id": f"c{i}", "path": path, "y": i % 2, "clip_start": s} for i, s in enumerate(starts)]
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    return DataConfig(manifest=str(tmp_path / "m.csv"), kind="video", clip_start_column="clip_start")


def test_bad_starts_are_manifest_errors_listing_the_rows(tmp_path, videos):
    path, _ = videos["mpeg4"]
    data = _manifest(tmp_path, ["0", "", "2.5", "abc", "-4", "12", "NA", "7.0"], path)
    with pytest.raises(ManifestError) as err:
        load_manifest(data, TaskConfig(type="binary", targets=["y"]))
    message = str(err.value)
    assert "3 problem(s)" in message
    assert "missing clip start ('clip_start'): 2 row(s): row 3 (id 'c1'), row 8 (id 'c6')" in message
    assert "not a whole number: 2 row(s): row 4 (id 'c2'): '2.5', row 5 (id 'c3'): 'abc'" in message
    assert "negative (frames count from 0): 1 row(s): row 6 (id 'c4'): '-4'" in message
    data = _manifest(tmp_path, ["0", "12", "7.0"], path)
    manifest = load_manifest(data, TaskConfig(type="binary", targets=["y"]))
    assert manifest.df["clip_start"].tolist() == [0, 12, 7] and manifest.df["clip_start"].dtype == np.int64
    with pytest.raises(ManifestError, match=r"lacks column\(s\) 'start' \(data.clip_start_column\)"):
        load_manifest(data.model_copy(update={"clip_start_column": "start"}), TaskConfig(type="binary", targets=["y"]))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"clip_position": "uniform"}, "clip_position: uniform / num_clips: 1 cannot apply"),
        ({"clip_position": "uniform", "num_clips": 3}, "num_clips: 3 cannot apply"),
        ({"clip_position": "random"}, "clip_position: random"),
        ({"kind": "image"}, "data.kind is image"),
    ],
)
def test_options_that_cannot_apply_are_config_errors(data, message):
    raw = {"name": "t", "data": {"manifest": "m.csv", "kind": "video", "clip_start_column": "s", **data},
           "task": {"type": "binary", "targets": ["y"]}}  # fmt: skip
    with pytest.raises(ConfigError, match="clip_start_column") as err:
        parse_config(raw)
    assert message in str(err.value)


def test_test_time_clips_are_a_config_error():
    raw = {"name": "t", "data": {"manifest": "m.csv", "kind": "video", "clip_start_column": "s"},
           "task": {"type": "binary", "targets": ["y"]},
           "adapt": {"strategy": "lora", "tta": {"clips": 3}}}  # fmt: skip
    with pytest.raises(ConfigError, match=r"adapt.tta.clips: 3 .*clip_start_column fixes each row's one clip"):
        parse_config(raw)


# --- the dataset and the feature cache ----------------------------------------------------------------


class PatchMeans(Encoder):
    """Image encoder whose tokens are 8x8 patch means: features follow the frames exactly."""

    def __init__(self):
        super().__init__()
        self.name = "patch-means"
        self.input_spec = InputSpec(kind="image", image_size=(16, 16), mean=(0.5,) * 3, std=(0.25,) * 3, patch_size=8)
        self.scale = nn.Parameter(torch.ones(()))
        self.seen = 0

    def encode(self, pixels, layers, attentions=False):
        self.seen += pixels.shape[0]
        tokens = F.avg_pool2d(pixels, 8).flatten(2).transpose(1, 2) * self.scale  # [B, 4, 3]
        names = [str(layer) for layer in layers]
        return EncoderOutput(tokens={n: tokens for n in names}, prefix={}, grid={n: (1, 2, 2) for n in names})

    def fingerprint(self):
        return "patch-means-1"


def test_dataset_reads_each_rows_window_and_refuses_rows_without_it(videos):
    path, _ = videos["mpeg4"]
    data = cfg(frames_per_clip=2)
    spec = InputSpec(kind="video", image_size=(SIZE, SIZE), mean=(0.0,) * 3, std=(1.0,) * 3)
    rows = pd.DataFrame({"sample_id": ["a", "b", "c"], "path": [path] * 3, "clip_start": [3, 90, 149]})
    ds = MediaDataset(rows, data, Preprocess(spec, data))
    firsts = [ds[i]["pixels"][0, 0].numpy() * 255 for i in range(2)]
    assert [frame_index(np.rint(f)) for f in firsts] == [3, 90]
    assert "clip start 149" in ds[2]["error"] and "sample 'c'" in ds[2]["error"]  # reported, not raised
    with pytest.raises(ValueError, match="no 'clip_start' column"):
        MediaDataset(rows.drop(columns="clip_start"), data, Preprocess(spec, data))


def test_two_windows_of_one_file_are_two_samples_in_the_cache(videos, tmp_path):
    path, _ = videos["mpeg4"]
    exp = parse_config({
        "name": "t",
        "data": {"manifest": "m.csv", "kind": "video", "frames_per_clip": 2, "clip_start_column": "clip_start"},
        "task": {"type": "binary", "targets": ["y"]},
        "features": {"cache_dir": str(tmp_path / "cache"), "batch_size": 2, "store_tokens": False},
    })

    def rows(starts):
        df = pd.DataFrame({"sample_id": ["a", "b"], "path": [path, path], "clip_start": starts})
        return types.SimpleNamespace(df=df)

    encoder = PatchMeans()
    first = run_extraction(exp, rows([0, 100]), encoder, progress=False)
    assert first.extracted == 2 and encoder.seen == 4  # 2 samples x 2 frames
    pooled = first.features.pooled(-1)
    assert not np.allclose(pooled[0], pooled[1])  # frames 0-1 and 100-101 differ

    again = run_extraction(exp, rows([0, 100]), PatchMeans(), progress=False)
    assert (again.extracted, again.cached) == (0, 2)
    moved = run_extraction(exp, rows([0, 7]), encoder := PatchMeans(), progress=False)
    assert (moved.extracted, moved.cached) == (1, 1) and encoder.seen == 2  # b's window moved: b is new
    one = read_media(path, exp.data, sample_id="b", clip_start=7)
    assert [frame_index(f) for f in one[0]] == [7, 8]
    assert not np.allclose(moved.features.pooled(-1)[1], pooled[1])
