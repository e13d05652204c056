"""fmprobe: honest, fast probing and adaptation of vision/video foundation models for medical imaging."""

__version__ = "0.1.0"
