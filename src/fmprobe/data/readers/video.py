"""Videos as clips: container files via PyAV, multi-frame DICOM (cine), and folders of frame images.

Only the frames a clip needs are decoded and kept, so long videos do not fill memory; container files are
decoded from the keyframe before each clip (frame-exact: frames are matched by timestamp), so a clip late in a
long video does not decode the video up to it. ``start`` (a row's ``data.clip_start_column``) fixes the clip.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass

import av
import numpy as np

from fmprobe.config import DataConfig
from fmprobe.data.readers.clips import clip_indices
from fmprobe.data.readers.dicom import dicom_frames, read_dataset
from fmprobe.data.readers.image import IMAGE_EXTENSIONS, decode_image
from fmprobe.data.readers.source import Source, extension

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mov", ".mkv")


def _to_clips(frames: dict[int, np.ndarray], idx: np.ndarray) -> np.ndarray:
    """``{frame index: [H, W, C]}`` + ``[K, T]`` indices -> ``[K, T, C, H, W]``."""
    stacked = np.stack([frames[i] for i in idx.ravel()])
    return stacked.reshape(*idx.shape, *stacked.shape[1:]).transpose(0, 1, 4, 2, 3)


@dataclass(frozen=True)
class FrameTable:
    """Where the frames of a video file are, from its demuxed packets (no decoding): how many, their
    presentation timestamps in display order (frame i = the i-th smallest), and the keyframes' timestamps
    (where decoding can start). ``pts`` is None when the container gives no usable timestamps."""

    n: int
    pts: np.ndarray | None
    keys: np.ndarray | None


_TABLES: OrderedDict[tuple[object, ...], FrameTable] = OrderedDict()
_MAX_TABLES = 32  # per process: the clips of one long video (rows of a manifest) demux it once


def frame_table(container: av.container.InputContainer, src: Source) -> FrameTable:
    """The table of the first video stream; a header that promises more frames than the file holds means the
    file is truncated."""
    if not container.streams.video:
        raise src.error("no video stream found (not a video, or corrupt or truncated?)")
    stream = container.streams.video[0]
    packets = [p for p in container.demux(stream) if p.size > 0]
    if stream.frames and len(packets) < stream.frames:
        raise src.error(f"video header says {stream.frames} frames but the file holds {len(packets)} (truncated?)")
    shown = [p for p in packets if not p.is_discard]  # discarded packets (edit lists) decode to no frame
    pts = [p.pts for p in shown]
    if None in pts or len(set(pts)) != len(pts):
        return FrameTable(len(shown), None, None)
    keys = np.array(sorted(p.pts for p in shown if p.is_keyframe), dtype=np.int64)
    return FrameTable(len(shown), np.array(sorted(pts), dtype=np.int64), keys if keys.size else None)


def _cached_table(container: av.container.InputContainer, src: Source) -> FrameTable:
    key = (src.url, src.stamp())
    table = _TABLES.get(key)
    if table is None:
        table = _TABLES[key] = frame_table(container, src)
        if len(_TABLES) > _MAX_TABLES:
            _TABLES.popitem(last=False)
    else:
        _TABLES.move_to_end(key)
    return table


def _seek_decode(container: av.container.InputContainer, table: FrameTable, idx: np.ndarray) -> dict[int, np.ndarray]:
    """The frames of each clip, decoded from the last keyframe at or before the clip's first frame. Frames are
    matched by timestamp, so the result is exact; a frame not found (a seek that landed late) is left out."""
    assert table.pts is not None and table.keys is not None
    stream = container.streams.video[0]
    frames: dict[int, np.ndarray] = {}
    for clip in idx:
        todo = sorted({int(i) for i in clip} - frames.keys())
        if not todo:
            continue
        first, last = int(table.pts[todo[0]]), int(table.pts[todo[-1]])
        before = np.searchsorted(table.keys, first, side="right") - 1
        container.seek(int(table.keys[max(before, 0)]), stream=stream, backward=True, any_frame=False)
        wanted = set(todo)
        for frame in container.decode(stream):
            if frame.pts is None:
                break
            i = int(np.searchsorted(table.pts, frame.pts))
            if i in wanted and table.pts[i] == frame.pts:
                frames[i] = frame.to_ndarray(format="rgb24")
            if frame.pts >= last:
                break
    return frames


def _decode_in_order(container: av.container.InputContainer, wanted: set[int]) -> dict[int, np.ndarray]:
    """The wanted frames, decoding from the first frame (frame i = the i-th frame out of the decoder)."""
    frames: dict[int, np.ndarray] = {}
    last = max(wanted)
    for i, frame in enumerate(container.decode(video=0)):
        if i in wanted:
            frames[i] = frame.to_ndarray(format="rgb24")
        if i >= last:
            break
    return frames


def read_video(src: Source, data: DataConfig, rng: np.random.Generator | None, start: int | None = None) -> np.ndarray:
    """``[K, T, 3, H, W]`` uint8 RGB frames from an mp4/avi/webm/mov/mkv file; ``start``: the row's clip start.

    The file is streamed, not loaded: only the frame table (one demux pass, remembered per file) and the
    stretch from the keyframe before each clip to its last frame are read and decoded.
    """
    try:
        with src.open() as f:
            with av.open(f) as container:
                table = _cached_table(container, src)
                if table.n == 0:
                    raise src.error("video has no frames (corrupt or truncated?)")
                idx = clip_indices(table.n, data, rng, start)
                wanted = {int(i) for i in idx.ravel()}
                frames = _seek_decode(container, table, idx) if table.keys is not None else {}
            if len(frames) < len(wanted):  # no timestamps to seek by, or a seek landed late: from the first frame
                f.seek(0)
                with av.open(f) as container:
                    frames = _decode_in_order(container, wanted)
    except av.FFmpegError as err:
        raise src.error(f"cannot decode video (corrupt or truncated?): {err}") from None
    if len(frames) < len(wanted):
        raise src.error(f"decoded only {len(frames)} of the {len(wanted)} frames needed out of {table.n} (corrupt?)")
    return _to_clips(frames, idx)


def read_dicom_video(
    src: Source, data: DataConfig, rng: np.random.Generator | None, start: int | None = None
) -> np.ndarray:
    """A multi-frame DICOM (e.g. an ultrasound cine loop) as ``[K, T, C, H, W]``."""
    frames = dicom_frames(read_dataset(src), src)
    idx = clip_indices(frames.shape[0], data, rng, start)
    return frames[idx].transpose(0, 1, 4, 2, 3)


def _natural_key(src: Source) -> list[int | str]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", src.name.lower())]


def read_frame_folder(
    folder: Source, data: DataConfig, rng: np.random.Generator | None, start: int | None = None
) -> np.ndarray:
    """A folder of frame images read like a video. Frames are ordered by natural sort of their names
    (frame_2 before frame_10); files that are not images are not frames and are left out."""
    files = sorted((f for f in folder.list_files() if extension(f.path) in IMAGE_EXTENSIONS), key=_natural_key)
    if not files:
        raise folder.error(f"folder has no frame images ({', '.join(IMAGE_EXTENSIONS)})")
    idx = clip_indices(len(files), data, rng, start)
    frames: dict[int, np.ndarray] = {}
    for i in sorted(set(idx.ravel().tolist())):
        frame = decode_image(files[i])
        if frames:
            first = next(iter(frames.values()))
            if frame.shape != first.shape or frame.dtype != first.dtype:
                raise files[i].error(
                    f"frame is {frame.shape} {frame.dtype}, earlier frames are {first.shape} {first.dtype}"
                )
        frames[i] = frame
    return _to_clips(frames, idx)
