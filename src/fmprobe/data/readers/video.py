"""Videos as clips: container files via PyAV, multi-frame DICOM (cine), and folders of frame images.

Only the frames a clip needs are decoded and kept, so long videos do not fill memory.
"""

from __future__ import annotations

import io
import re

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


def _count_frames(raw: bytes, src: Source) -> int:
    """Frames in the first video stream, counted from demuxed packets (no decoding); a header that
    promises more frames than the file holds means the file is truncated."""
    with av.open(io.BytesIO(raw)) as container:
        if not container.streams.video:
            raise src.error("no video stream found (not a video, or corrupt or truncated?)")
        stream = container.streams.video[0]
        n = sum(1 for packet in container.demux(stream) if packet.size > 0)
        if stream.frames and n < stream.frames:
            raise src.error(f"video header says {stream.frames} frames but the file holds {n} (truncated?)")
    return n


def read_video(src: Source, data: DataConfig, rng: np.random.Generator | None) -> np.ndarray:
    """``[K, T, 3, H, W]`` uint8 RGB frames from an mp4/avi/webm/mov/mkv file."""
    raw = src.read_bytes()
    try:
        n = _count_frames(raw, src)
        if n == 0:
            raise src.error("video has no frames (corrupt or truncated?)")
        idx = clip_indices(n, data, rng)
        wanted, last = set(idx.ravel().tolist()), int(idx.max())
        frames: dict[int, np.ndarray] = {}
        with av.open(io.BytesIO(raw)) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    frames[i] = frame.to_ndarray(format="rgb24")
                if i >= last:
                    break
    except av.FFmpegError as err:
        raise src.error(f"cannot decode video (corrupt or truncated?): {err}") from None
    if len(frames) < len(wanted):
        raise src.error(f"decoded only {len(frames)} of the {len(wanted)} frames needed out of {n} (corrupt?)")
    return _to_clips(frames, idx)


def read_dicom_video(src: Source, data: DataConfig, rng: np.random.Generator | None) -> np.ndarray:
    """A multi-frame DICOM (e.g. an ultrasound cine loop) as ``[K, T, C, H, W]``."""
    frames = dicom_frames(read_dataset(src), src)
    idx = clip_indices(frames.shape[0], data, rng)
    return frames[idx].transpose(0, 1, 4, 2, 3)


def _natural_key(src: Source) -> list[int | str]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", src.name.lower())]


def read_frame_folder(folder: Source, data: DataConfig, rng: np.random.Generator | None) -> np.ndarray:
    """A folder of frame images read like a video. Frames are ordered by natural sort of their names
    (frame_2 before frame_10); files that are not images are not frames and are left out."""
    files = sorted((f for f in folder.list_files() if extension(f.path) in IMAGE_EXTENSIONS), key=_natural_key)
    if not files:
        raise folder.error(f"folder has no frame images ({', '.join(IMAGE_EXTENSIONS)})")
    idx = clip_indices(len(files), data, rng)
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
