"""Which frames (or slices) make up each clip: the one rule shared by videos, frame folders and volumes."""

from __future__ import annotations

import numpy as np

from fmprobe.config import DataConfig


class ClipWindowError(ValueError):
    """A row's clip window (``data.clip_start_column``) does not fit in its sequence; ``read_media`` turns it
    into a ReaderError naming the sample and the file."""

    def __init__(self, start: int, last: int, n_frames: int):
        self.start, self.last, self.n_frames = start, last, n_frames
        super().__init__(f"clip start {start}, window {start}..{last}, {n_frames} frames")


def clip_indices(
    n_frames: int, data: DataConfig, rng: np.random.Generator | None = None, start: int | None = None
) -> np.ndarray:
    """Frame indices ``[K, T]`` for a sequence of ``n_frames``.

    A clip is ``frames_per_clip`` frames ``frame_step`` apart. With ``start`` (the row's value of
    ``data.clip_start_column``) the one clip begins at frame ``start`` and must end inside the sequence,
    else ClipWindowError: a window is never shifted or padded, because it stands for a labelled moment.
    Otherwise ``center`` takes the middle clip; ``uniform`` takes ``num_clips`` clips with evenly spaced
    starts from first to last possible start; ``random`` takes one clip at a start drawn from ``rng``.

    When the sequence is shorter than a clip (no ``start``), indices past the end are clamped to the last
    frame, i.e. the last frame is repeated (no looping, no resampling): a 5-frame video read with
    ``frames_per_clip: 8`` gives frames 0 1 2 3 4 4 4 4.
    """
    if n_frames < 1:
        raise ValueError(f"a clip needs at least one frame, got {n_frames}")
    offsets = np.arange(data.frames_per_clip) * data.frame_step
    if start is not None:
        if data.clip_position != "center" or data.num_clips != 1:
            raise ValueError("a clip start fixes the one clip of a row: it needs clip_position center, num_clips 1")
        if start < 0 or start + int(offsets[-1]) >= n_frames:
            raise ClipWindowError(start, start + int(offsets[-1]), n_frames)
        return (start + offsets)[None, :]
    last_start = max(0, n_frames - (int(offsets[-1]) + 1))
    if data.clip_position == "center":
        starts = np.array([last_start // 2])
    elif data.clip_position == "uniform":
        starts = np.round(np.linspace(0, last_start, data.num_clips)).astype(np.int64)
    else:
        if rng is None:
            raise ValueError("clip_position 'random' needs an rng (np.random.Generator)")
        starts = rng.integers(0, last_start + 1, size=1)
    return np.minimum(starts[:, None] + offsets[None, :], n_frames - 1)
