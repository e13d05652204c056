"""Probes fitted on cached features: heads x seeds (and learning-rate x weight-decay grids), the frozen
segmentation decoder, their inputs and targets. Every fit goes through the training core (``fmprobe.train``)."""
