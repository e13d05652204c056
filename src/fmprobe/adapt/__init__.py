"""Adaptation beyond frozen probes: LoRA, partial unfreezing and staged training of backbone + head end to end."""
