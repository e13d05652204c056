"""The `fmprobe` command line. Each command calls a library function; no logic lives here."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from fmprobe.diagnostics.alignment_conventions import DEFAULT as ALIGN
from fmprobe.diagnostics.alignment_conventions import AlignmentConventions
from fmprobe.errors import FmprobeError
from fmprobe.report.progress import Progress, stdout_console

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = stdout_console()  # redirected to a file: plain, unwrapped lines
err_console = Console(stderr=True)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print an FmprobeError as one clear message and exit 2; anything else is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FmprobeError as err:
            err_console.print(f"[bold red]error:[/] {err}", highlight=False, markup=True, soft_wrap=True)
            sys.exit(2)

    return wrapper


def side_progress() -> Progress:
    """Progress of a command whose stdout is its result (JSON, a table): drawn on stderr."""
    return Progress(stdout_console(sys.stderr))


@app.callback()
def main() -> None:
    """Probe and adapt pretrained vision/video foundation models on medical imaging tasks."""


@app.command()
@user_errors
def run(config: Path = typer.Argument(..., help="experiment YAML"),
        quiet: bool = typer.Option(False, help="no progress bars")) -> None:
    """Run one experiment: features (cached) -> heads x seeds -> metrics, CIs, baselines, flags, report."""
    from fmprobe import distributed
    from fmprobe.config import load_config
    from fmprobe.experiments.run import run_experiment
    from fmprobe.report.efficiency import print_efficiency
    from fmprobe.report.terminal import print_summary

    result = run_experiment(load_config(config), progress=not quiet)
    if distributed.is_main():  # launched as several processes (torchrun / accelerate launch): print once
        print_summary(console, result.metrics, result.run_dir, more=[print_efficiency])


def _numbers(text: str | None, kind: type, option: str) -> list | None:
    """``"1,2,4"`` -> [1, 2, 4]; a bad entry is an error naming the option."""
    if text is None:
        return None
    try:
        return [kind(part) for part in text.split(",")]
    except ValueError:
        raise typer.BadParameter(f"{option} takes comma-separated {kind.__name__}s, got '{text}'") from None


@app.command()
@user_errors
def efficiency(config: Path = typer.Argument(..., help="experiment YAML"),
               shots: str = typer.Option(None, help="examples per class, e.g. 1,2,4,8,16,32 (default: the config's "
                                         "train.shots, else these for binary / multiclass tasks)"),
               fractions: str = typer.Option(None, help="shares of the training groups, e.g. 0.01,0.1,1 (default: "
                                             "train.label_fractions, else 0.01,0.05,0.1,0.25,0.5,1)"),
               target: float = typer.Option(None, help="primary-metric value: the fewest labels whose interval's "
                                            "lower bound reaches it (eval.target)"),
               episodes: int = typer.Option(None, help="few-shot episodes of fitted heads (train.episodes)"),
               quiet: bool = typer.Option(False, help="no progress bars")) -> None:
    """How many labels does it need: the run, then every head on few-shot episodes and nested label fractions."""
    from fmprobe.experiments.efficiency import efficiency_config
    from fmprobe.experiments.run import run_experiment
    from fmprobe.report.efficiency import print_efficiency
    from fmprobe.report.terminal import print_summary

    exp = efficiency_config(config, shots=_numbers(shots, int, "--shots"),
                            fractions=_numbers(fractions, float, "--fractions"), target=target, episodes=episodes)
    result = run_experiment(exp, progress=not quiet)
    print_summary(console, result.metrics, result.run_dir, more=[print_efficiency])


@app.command()
@user_errors
def extract(config: Path = typer.Argument(..., help="experiment YAML")) -> None:
    """Fill the feature cache for an experiment (extracts only what is not cached yet)."""
    from fmprobe import distributed
    from fmprobe.experiments.clock import extraction_progress
    from fmprobe.features.extract import extract_command

    summary = extract_command(config, progress=extraction_progress(config.stem))
    for key, value in summary.items() if distributed.is_main() else ():
        console.print(f"{key}: {value}", highlight=False)


@app.command()
@user_errors
def demo(out: Path = typer.Option(Path("fmprobe-demo"), help="folder for the demo data, cache and runs"),
         quiet: bool = typer.Option(False, help="no progress bars")) -> None:
    """The offline demo: MNI152 brain patches, DINOv2-S, linear and attentive probes, two tasks."""
    from fmprobe.demo.run import run_demo
    from fmprobe.report.terminal import print_summary

    results = run_demo(out, progress=not quiet)
    for result in results:
        print_summary(console, result.metrics, result.run_dir)
    console.print("\n[bold]Reports to open:[/]")
    for result in results:
        console.print(f"  {(result.run_dir / 'report.html').resolve()}", markup=False)


@app.command()
@user_errors
def compare(run_a: Path = typer.Argument(..., help="run directory A"),
            run_b: Path = typer.Argument(..., help="run directory B"),
            metric: str = typer.Option(None, help="default: the task's primary metric"),
            head_a: str = typer.Option(None, help="default: run A's selected head"),
            head_b: str = typer.Option(None, help="default: run B's selected head"),
            resamples: int = typer.Option(2000, help="bootstrap resamples"),
            json_out: Path = typer.Option(None, "--json", help="also write the result as JSON")) -> None:
    """Paired bootstrap of metric(A) - metric(B) on the same test samples: A's and B's scores (as the run tables
    show them), the difference, its CI and p-value."""
    import json

    from fmprobe.atomic import write_json
    from fmprobe.experiments.compare_runs import compare_runs
    from fmprobe.report.terminal import comparison_lines

    result = compare_runs(run_a, run_b, head_a=head_a, head_b=head_b, metric=metric, n_resamples=resamples)
    for line in comparison_lines(result):
        console.print(line, highlight=False)
    console.print_json(json.dumps(result))
    if json_out:
        write_json(json_out, result)
        console.print(f"written: {json_out}")


@app.command()
@user_errors
def align(a: str = typer.Argument(..., help="FILE.npy, CONFIG.yaml[:LAYER[:POOLING]] or STORE_DIR[:LAYER[:POOLING]]"),
          b: str = typer.Argument(..., help="the same forms as A"),
          metric: list[str] = typer.Option(None, "--metric", help="repeatable; default: all (one layer per side) "
                                           "or linear_cka (layer x layer)"),
          out: Path = typer.Option(Path("fmprobe-align"), help="folder for alignment.json and the figure(s)"),
          seed: int = typer.Option(0, help="seed of linear_r2's held-out split"),
          bootstrap: int = typer.Option(0, help="resamples for CKA CIs (linear_cka, rbf_cka); 0: none"),
          knn_k: int = typer.Option(ALIGN.knn_k, help="k of mutual_knn and knn_recall (recall@k)"),
          knn_metric: str = typer.Option(ALIGN.knn_metric, help="neighbours by: cosine | euclidean"),
          rbf_sigma_factor: float = typer.Option(ALIGN.rbf_sigma_factor,
                                                 help="RBF bandwidth sigma = this x the median distance"),
          rbf_median: str = typer.Option(ALIGN.rbf_median, help="which median: distinct-pairs (i < j) | full-matrix "
                                         "(sqrt of the median squared distance, diagonal included: Kornblith's code)"),
          rsa_dissimilarity: str = typer.Option(ALIGN.rsa_dissimilarity,
                                                help="RSA dissimilarity: correlation (1 - Pearson r) | euclidean"),
          rsa_rank_correlation: str = typer.Option(ALIGN.rsa_rank_correlation,
                                                   help="RSA compares dissimilarities by: spearman | kendall (tau-b)"),
          r2_test_fraction: float = typer.Option(ALIGN.r2_test_fraction, help="share of samples linear_r2 holds "
                                                 "out")) -> None:
    """Representation alignment of A and B (CKA, mutual kNN, RSA, ...) as JSON, with a bar chart or heatmap.

    alignment.json records every convention used (the options above) next to the values."""
    import json

    from fmprobe.diagnostics.align_cli import align_command
    from fmprobe.experiments.clock import extraction_progress

    conventions = AlignmentConventions(knn_k=knn_k, knn_metric=knn_metric, rbf_sigma_factor=rbf_sigma_factor,
                                       rbf_median=rbf_median, rsa_dissimilarity=rsa_dissimilarity,
                                       rsa_rank_correlation=rsa_rank_correlation, r2_test_fraction=r2_test_fraction)
    tick = extraction_progress("alignment", side_progress())
    typer.echo(json.dumps(align_command(a, b, metric or None, out=out, seed=seed, bootstrap=bootstrap,
                                        conventions=conventions, progress=tick), indent=2))


@app.command("layers")
@user_errors
def layers_cmd(config: Path = typer.Argument(..., help="experiment YAML"),
               layers: str = typer.Option(None, help="comma-separated, e.g. 0,3,6,-1 (default: model.layers)"),
               heads: str = typer.Option(None, help="head types, e.g. linear,attentive (default: the config's)"),
               quiet: bool = typer.Option(False, help="no progress bars")) -> None:
    """Layer-wise probing: one run with a head per (layer, head type); primary metric with CI against depth."""
    from fmprobe.config import load_config
    from fmprobe.experiments.layers import layers_command, parse_layers

    summary = layers_command(load_config(config), parse_layers(layers) if layers else None,
                             [h.strip() for h in heads.split(",")] if heads else None, progress=not quiet)
    for row in summary["rows"]:
        console.print(f"{row['head_type']:>10} layer {row['layer']:>6}: {row['metric']} {row['test_mean']:.3f} "
                      f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}] (val {row['val_mean']:.3f})", highlight=False)
    console.print(f"best on validation: {summary['best_on_validation']['head']}\n{summary['run_dir']}/layers.html")


@app.command("attention")
@user_errors
def attention_cmd(config: Path = typer.Argument(None, help="experiment YAML (backbone attention)"),
                  run: Path = typer.Option(None, help="a finished run directory (its attentive probes)"),
                  samples: int = typer.Option(8, help="samples to encode (backbone)"),
                  out: Path = typer.Option(None, help="default: fmprobe-attention, or RUN/attention")) -> None:
    """Attention entropy per layer and head, by label group, and heatmaps over the images (or of a run's probes)."""
    import json

    from fmprobe.diagnostics.attention_command import attention_command

    tick = side_progress().counter("attention", "heads" if run else "samples")
    typer.echo(json.dumps(attention_command(config, run=run, samples=samples, out=out, progress=tick), indent=2))


@app.command("spatial")
@user_errors
def spatial_cmd(encoder: str = typer.Option("pixel", help="pixel | random | CONFIG.yaml | model dir or hub id"),
                layers: str = typer.Option(None, help="comma-separated extraction points (default: model.layers)"),
                n_train: int = typer.Option(96), n_test: int = typer.Option(32),
                image_size: int = typer.Option(None, help="default: the encoder's"),
                steps: int = typer.Option(300, help="optimisation steps per probe"), seed: int = typer.Option(0),
                out: Path = typer.Option(Path("fmprobe-spatial"), help="folder for spatial.json"),
                frames: int = typer.Option(None, help="moving shapes: clips of this many frames"),
                bootstrap: int = typer.Option(1000, help="resamples of the test samples for CIs; 0: none"),
                control: list[str] = typer.Option(None, help="probed on the same shapes, each point compared with it "
                                                             "(paired CI): pixel | random-weights | random")) -> None:
    """Spatial probes (box, mask, detection) on the built-in shapes data, per extraction point."""
    from fmprobe.experiments.layers import parse_layers
    from fmprobe.diagnostics.spatial_run import format_table, spatial_command

    result = spatial_command(encoder, layers=parse_layers(layers) if layers else None, n_train=n_train,
                             n_test=n_test, image_size=image_size, steps=steps, seed=seed, out=out, frames=frames,
                             bootstrap=bootstrap, controls=control or (),
                             progress=side_progress().counter("spatial probes", "points"))
    typer.echo(format_table(result))
    typer.echo(f"written: {out / 'spatial.json'}")


@app.command()
@user_errors
def reconstruct(encoder: str = typer.Option(..., help="CONFIG.yaml of the model (its model.layers are the points)"),
                vae: Path = typer.Option(..., help="CONFIG.yaml of a diffusers VAE (model.image_size; e.g. LTX-Video's)"),
                layers: str = typer.Option(None, help="comma-separated extraction points (default: model.layers)"),
                n_train: int = typer.Option(96), n_val: int = typer.Option(16), n_test: int = typer.Option(32),
                adapter: str = typer.Option("mlp", help="mlp (per token, on the latent grid) | queries (one per "
                                                        "latent token, cross-attention)"),
                loss: str = typer.Option("pixels", help="pixels: LPIPS + 0.1 L2 of the decoded image | latents: L2"),
                epochs: int = typer.Option(50), lr: float = typer.Option(1e-4), batch_size: int = typer.Option(8),
                hidden: int = typer.Option(512, help="adapter width"), seed: int = typer.Option(0),
                bootstrap: int = typer.Option(1000, help="resamples of the test images for CIs"),
                control: list[str] = typer.Option(None, help="pixel | random-weights | random, through the same "
                                                             "adapter on the same images (paired CI)"),
                lpips_backbone: Path = typer.Option(None, help="torchvision AlexNet ImageNet state dict for LPIPS "
                                                                "(default: torch hub's cached alexnet-owt-7be5be79.pth)"),
                out: Path = typer.Option(Path("fmprobe-reconstruct"), help="folder for reconstruct.json")) -> None:
    """Adapter from each point's tokens to a VAE's latents, images rendered by its decoder: LPIPS, SSIM, edge F1,
    spatial IoU and AP@0.5 of the renders with CIs, and a gallery per point."""
    from fmprobe.diagnostics.reconstruct_run import reconstruct_command
    from fmprobe.experiments.layers import parse_layers

    result = reconstruct_command(encoder, str(vae), layers=parse_layers(layers) if layers else None, n_train=n_train,
                                 n_val=n_val, n_test=n_test, adapter=adapter, loss=loss, epochs=epochs, lr=lr,
                                 batch_size=batch_size, hidden=hidden, seed=seed, bootstrap=bootstrap,
                                 controls=control or (), lpips_backbone=lpips_backbone, out=out)  # fmt: skip
    for r in result["results"]:
        typer.echo(f"{r['layer']:<34} LPIPS {r['lpips']:.3f}  SSIM {r['ssim']:.3f}  edge F1 {r['edge_f1']:.3f}  "
                   f"spatial IoU {r['spatial_iou']:.3f}  AP@0.5 {r['map50']:.3f}")
    typer.echo(f"written: {out / 'reconstruct.json'}")


@app.command()
@user_errors
def sweep(spec: Path = typer.Argument(..., help="sweep YAML: base config + grid of dotted keys"),
          workers: int = typer.Option(None, help="local processes (default: the sweep's, else one per 2 cores)"),
          ray: bool = typer.Option(False, "--ray", help="run on Ray (a local instance unless --address)"),
          address: str = typer.Option(None, help="Ray cluster address (implies --ray)"),
          gates: Path = typer.Option(None, help="gates YAML: verdicts in the sweep report")) -> None:
    """Run a grid of experiments (resumable: finished runs are skipped); features extracted once per backbone."""
    from fmprobe.experiments.sweep import run_sweep

    result = run_sweep(spec, workers=workers, use_ray=ray, ray_address=address, gates=gates,
                       progress=Progress(console))
    console.print(f"report: {result.report}")


@app.command()
@user_errors
def report(runs: Path = typer.Argument(Path("runs"), help="runs folder"),
           out: Path = typer.Option(None, help="default: RUNS/index.html")) -> None:
    """One page listing every run (finished, failed, unfinished) with its headline metric, CI, flags and report."""
    from fmprobe.experiments.overview import runs_index_command

    page, counts = runs_index_command(runs, out)
    console.print(f"{sum(counts.values())} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items()), markup=False)
    console.print(f"written: {page.resolve()}", markup=False)


@app.command()
@user_errors
def leaderboard(runs: Path = typer.Option(Path("runs"), help="runs folder"),
                experiment: str = typer.Option(None, help="only this experiment"),
                metric: str = typer.Option(None, help="default: the runs' primary metric; seg/miou: the segmentation "
                                                      "decoder's mIoU"),
                csv: Path = typer.Option(None, help="also write the table as CSV"),
                html: Path = typer.Option(None, help="also write a self-contained HTML report"),
                gates: Path = typer.Option(None, help="gates YAML: verdicts in the HTML report")) -> None:
    """Every run x head with metric ± CI, seeds, baseline, flags, parameters, wall time (ranked on validation)."""
    from fmprobe.experiments.gates import gate_command
    from fmprobe.experiments.leaderboard import build_leaderboard, print_leaderboard
    from fmprobe.report.sweep import write_board_report

    board = build_leaderboard(runs, experiment=experiment, metric=metric)
    print_leaderboard(console, board)
    if csv:
        board.to_csv(csv)
        console.print(f"written: {csv}")
    if html:
        verdicts = gate_command(gates, runs, run_dirs=board.table["run_dir"]) if gates else None
        title = f"Leaderboard of {experiment}" if experiment else f"Leaderboard of the runs in {runs.resolve()}"
        write_board_report(html, [board], verdicts, title=title)
        console.print(f"written: {html}")


@app.command()
@user_errors
def gate(gates: Path = typer.Argument(..., help="gates YAML: criteria, levels, must/should, weights"),
         runs: Path = typer.Option(Path("runs"), help="runs folder"),
         json_out: Path = typer.Option(None, "--json", help="also write the verdicts as JSON")) -> None:
    """A verdict per candidate, decided with the CI, and one recommendation; exit 1 when none is accepted."""
    from fmprobe.atomic import write_json
    from fmprobe.experiments.gates import gate_command, print_gates

    report = gate_command(gates, runs)
    print_gates(console, report)
    if json_out:
        write_json(json_out, report.to_dict())
    if report.chosen is None:
        raise typer.Exit(1)


@app.command("gate-points")
@user_errors
def gate_points_cmd(gates: Path = typer.Argument(..., help="gates YAML (split: test criteria)"),
                    spatial: list[Path] = typer.Option(..., help="spatial.json or its folder (still and/or moving, "
                                                                 "one or several models)"),
                    align: list[Path] = typer.Option(None, help="alignment.json (a model's points as A, a reference "
                                                                "as B); one per model"),
                    pair: list[Path] = typer.Option(None, help="pair.json of fmprobe compare-points"),
                    table: list[Path] = typer.Option(None, help="metric table CSV (model, point, metric, mean, "
                                                                "ci_lo, ci_hi) of any other measurement"),
                    reconstruct: list[Path] = typer.Option(None, help="reconstruct.json (recon/... metrics, galleries)"),
                    speed: list[Path] = typer.Option(None, help="speed.json (speed_ratio to the baseline)"),
                    out: Path = typer.Option(Path("fmprobe-gate-points"), help="folder for gates.json, report")) -> None:
    """A gate verdict per extraction point of one or several models, the decision matrix, and a recommendation."""
    from fmprobe.experiments.gates import print_gates
    from fmprobe.experiments.point_gates import points_command

    report = points_command(gates, spatial, align or (), pairs=pair or (), tables=table or (),
                            reconstructions=reconstruct or (), speeds=speed or (), out=out)
    print_gates(console, report)
    console.print(f"report: {out / 'report.html'}")
    if report.chosen is None:
        raise typer.Exit(1)


@app.command()
@user_errors
def speed(model: list[str] = typer.Option(..., help="CONFIG.yaml of a model; every point of its model.layers is timed"),
          baseline: str = typer.Option(..., help="CONFIG.yaml of the baseline (the study: Qwen2.5-VL)"),
          baseline_point: str = typer.Option(..., help="the baseline's point the ratios refer to"),
          batch: int = typer.Option(2), repeats: int = typer.Option(5), warmup: int = typer.Option(1),
          out: Path = typer.Option(Path("fmprobe-speed"), help="folder for speed.json")) -> None:
    """Seconds per image of every model and point, and their ratio to the baseline timed in the same run."""
    from fmprobe.diagnostics.speed import speed_command
    from fmprobe.experiments.layers import parse_layers

    result = speed_command(model, baseline, parse_layers(baseline_point)[0], batch=batch, repeats=repeats,
                           warmup=warmup, out=out)  # fmt: skip
    for r in result["results"]:
        typer.echo(f"{r['model']:<30} {r['point']:<34} {r['seconds_per_image']:.4f} s/image  "
                   f"{r['ratio']:.2f}x [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]")
    typer.echo(f"written: {out / 'speed.json'}")


@app.command("spatial-sweep")
@user_errors
def spatial_sweep_cmd(spec: Path = typer.Argument(..., help="sweep YAML: models, gates, spatial / align options")) -> None:
    """Spatial probes and alignment of several models at all their points (resumable), then the decision matrix."""
    from fmprobe.experiments.gates import print_gates
    from fmprobe.experiments.point_sweep import run_point_sweep

    report = run_point_sweep(spec, on_event=lambda m: console.print(m, highlight=False))
    print_gates(console, report)
    if report.chosen is None:
        raise typer.Exit(1)


@app.command("compare-points")
@user_errors
def compare_points_cmd(spatial: Path = typer.Argument(..., help="spatial.json (or its folder) holding both points"),
                       a: str = typer.Argument(..., help="point A, e.g. -2@tiles"),
                       b: str = typer.Argument(..., help="point B, e.g. -2@base"),
                       resamples: int = typer.Option(2000, help="bootstrap resamples"),
                       out: Path = typer.Option(Path("fmprobe-compare-points"), help="folder for pair.json")) -> None:
    """Paired bootstrap of box / mask IoU(A) - IoU(B) over the same test shapes: difference, CI, p-value (JSON)."""
    import json

    from fmprobe.diagnostics.spatial_pairs import pair_command

    console.print_json(json.dumps(pair_command(spatial, a, b, out=out, n_resamples=resamples)))
