"""Error types. Every error fmprobe raises on purpose says what is wrong and what to do about it.

The CLI prints these as one clear message (no traceback) and exits non-zero; anything else is a bug.
"""


class FmprobeError(Exception):
    """Base class for errors a user can act on."""


class ConfigError(FmprobeError):
    """A config key has a bad value, is unknown, or cannot be honoured."""


class ManifestError(FmprobeError):
    """The manifest is malformed: missing columns, duplicate ids, missing files, bad targets."""


class ReaderError(FmprobeError):
    """A media file could not be read. The message names the sample id and the file."""

    def __init__(self, message: str, *, sample_id: str | None = None, path: str | None = None):
        where = ", ".join(p for p in (f"sample '{sample_id}'" if sample_id else "", f"file '{path}'" if path else "") if p)
        super().__init__(f"{where}: {message}" if where else message)
        self.sample_id = sample_id
        self.path = path
        self.reason = message


class EncoderError(FmprobeError):
    """The backbone cannot take this input honestly (wrong size, frames, layer) or cannot be loaded."""


class LeakageError(FmprobeError):
    """A group (patient, video, volume) appears on two sides of a split."""
