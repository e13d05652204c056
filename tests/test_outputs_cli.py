"""`fmprobe run CONFIG > log`: a log a researcher can grep — whole lines (no path or metric name broken or
truncated), progress lines for every long step with the final counts, the verdict, the report's absolute path,
and none of transformers' own bars."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml
from run_factories import base_config


def test_run_into_a_log_file_prints_whole_lines_progress_verdict_and_report_path(tmp_path):
    folder = tmp_path / ("a-folder-name-long-enough-to-wrap-any-terminal-" * 3).rstrip("-")
    folder.mkdir()
    cfg = base_config(folder)
    cfg["heads"] = [{"type": "linear"}, {"type": "attentive", "pooling": "attentive", "num_heads": 2}, {"type": "knn"}]
    cfg["train"]["label_fractions"] = [0.5, 1.0]
    config = folder / "exp.yaml"
    config.write_text(yaml.safe_dump(cfg))
    log, errors = tmp_path / "run.log", tmp_path / "run.err"
    with open(log, "w") as out, open(errors, "w") as err:
        code = subprocess.run([sys.executable, "-m", "fmprobe", "run", str(config)], stdout=out, stderr=err,
                              timeout=600).returncode  # fmt: skip
    text, stderr = log.read_text(), errors.read_text()
    assert code == 0, stderr[-3000:]
    lines = text.splitlines()
    run_dir = next((folder / "runs" / "tiny").iterdir())
    metrics = json.loads((run_dir / "metrics.json").read_text())

    # the last line: the report's absolute path, whole
    assert lines[-1] == f"report: {run_dir / 'report.html'}" and run_dir.is_absolute()
    # progress of every long step, with the true final counts
    assert "extract tiny: 72/72 samples in " in text
    assert any(line.startswith("train tiny: ") and " 4 fits" in line for line in lines)
    assert "evaluate tiny: 3/3 heads in " in text
    # the fitted head's choice and the label-efficiency table, before the verdict
    assert any(line.startswith("fitted heads, chosen on validation auroc: knn → k ") for line in lines)
    table = lines.index(next(line for line in lines if line.startswith("label efficiency · test auroc")))
    assert table < lines.index(next(line for line in lines if line.startswith("verdict tiny: ")))
    # every metric name of the headline table whole, on its row; nothing truncated or wrapped
    assert "…" not in text and "\x1b[" not in text and "\r" not in text
    for head in metrics["heads"]:
        for metric in metrics["task"]["headline_metrics"]:
            assert any(line.split()[:2] == [head, metric] or line.split()[:3] == [head, "*", metric]
                       for line in lines), (head, metric)  # fmt: skip
    # every flag message on one line, as metrics.json has it
    for flag in metrics["flags"]:
        assert f"flag {flag['name']} ({flag['head']}): {flag['message']}" in lines
    verdict = next(line for line in lines if line.startswith("verdict tiny: "))
    assert f"{metrics['selection']['best_head']} (selected on validation)" in verdict and "95% CI" in verdict
    assert metrics["selection"]["runner_up"]["head"] in verdict
    # transformers' bars are silenced inside fmprobe's output
    assert "Loading weights" not in text + stderr
