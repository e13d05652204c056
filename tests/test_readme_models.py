"""The README's "Your own model" table stays true: every config line there is a valid model section."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from fmprobe.config import ModelConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_model_line_of_the_readme_table_validates():
    text = README.read_text()
    table = text[text.index("Well-known medical foundation models"):text.index("## Commands")]
    lines = re.findall(r"\| `(\{kind: .*\})` \|$", table, flags=re.MULTILINE)
    kinds = {ModelConfig(**yaml.safe_load(line)).kind for line in lines}
    assert len(lines) == 10 and kinds == {"timm", "open_clip", "monai", "python"}
