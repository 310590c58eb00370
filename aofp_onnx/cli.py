"""The `aofp-onnx` command line: a thin layer over `aofp_onnx.api`.

Exit codes: 0 done; 2 the input was refused (one line on stderr, nothing written); 3 the result failed
verification (nothing written; `verify`: a mismatch); 1 an internal error; 130 interrupted. Set
AOFP_ONNX_DEBUG=1 for tracebacks.
"""
from __future__ import annotations

import json
import os
import sys
import textwrap
import traceback

import click

from . import api
from .calib import parse_image_options, parse_input_shapes
from .errors import InputError, VerificationError
from .summary import cut_lines, finetune_lines, prune_hints, show_fidelity
from .io import write_atomic

shape_option = click.option("--input-shape", "input_shape", multiple=True, metavar="NAME:D0,D1,..",
                            help="Fix an input's dims (repeatable); needed for dynamic dims without data.")
reconstruct_option = click.option(
    "--reconstruct", is_flag=True,
    help="After the cut (verified first), re-fit the weights of each layer that lost input channels by least "
         "squares on the calibration data so its output matches the original model's.")
verify_samples_option = click.option(
    "--verify-samples", type=int, default=api.VERIFY_SAMPLES, show_default=True,
    help="Calibration samples the cut is verified on (layer by layer against the masked original).")
progress_option = click.option("--no-progress", is_flag=True, help="No progress lines on stderr.")
provider_option = click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                               show_default=True, help="onnxruntime execution provider.")


def options_of(options: list):
    """A decorator adding `options` to a command, in the order given."""
    def deco(f):
        for opt in reversed(options):
            f = opt(f)
        return f
    return deco


image_options = options_of([  # how an image-folder SRC becomes input tensors
    click.option("--image-size", metavar="HxW", help="Resize images to H×W (default: the model's fixed dims)."),
    click.option("--mean", metavar="M[,M,M]", help="Per-channel mean subtracted after scaling."),
    click.option("--std", metavar="S[,S,S]", help="Per-channel std divided after the mean."),
    click.option("--pixel-scale", type=float, default=1 / 255, show_default=True, help="Pixel multiplier."),
    click.option("--channel-order", type=click.Choice(["rgb", "bgr"]), default="rgb", show_default=True),
    click.option("--layout", type=click.Choice(["nchw", "nhwc"]), default="nchw", show_default=True),
    click.option("--grayscale", is_flag=True, help="Decode images as one channel."),
])


class Interrupted(Exception):
    """Ctrl-C with something to say (where the search state was saved)."""


def _write_json(path, data) -> None:
    write_atomic(path, (json.dumps(data, indent=1) + "\n").encode())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="aofp-onnx")
def cli():
    """Prune whole convolution filters of an ONNX CNN with AOFP, verified against the masked original."""


@cli.command()
@click.argument("model", type=click.Path())
@shape_option
@click.option("--json", "json_out", type=click.Path(), help="Write the inspection as JSON here.")
@click.option("--all", "show_all", is_flag=True, help="List every group (default: the 40 largest by MACs).")
def inspect(model, input_shape, json_out, show_all):
    """Show the channel groups of MODEL: width, MACs, and why a group cannot be pruned."""
    if json_out:
        api.check_output_path(model, json_out)
    info = api.inspect(model, parse_input_shapes(list(input_shape)))
    if json_out:
        _write_json(json_out, info)
    groups = info["groups"]
    prunable = [g for g in groups if g["prunable"]]
    click.echo(f"{info['model']}  opset {info['opset']}  inputs {info['input_shapes']}")
    for note in info["notes"]:
        click.echo(f"note: {note}")
    click.echo(f"MACs {info['macs']:,}  params {info['params']:,}  groups {len(groups)} ({len(prunable)} prunable)  "
               f"prunable MACs {100 * info['prunable_macs_fraction']:.1f}%")
    shown = groups if show_all else sorted(groups, key=lambda g: -g["macs"])[:40]
    width = min(60, max([len(g["id"]) for g in shown] + [5]))
    click.echo(f"{'group':<{width}} {'width':>6} {'MACs*':>14}  status")
    for g in shown:
        status = "prunable" if g["prunable"] else f"blocked: {g['reason']}"
        gid = g["id"] if len(g["id"]) <= width else "…" + g["id"][-width + 1:]
        click.echo(f"{gid:<{width}} {g['width']:>6} {g['macs']:>14,}  {status}")
        if show_all:
            click.echo(f"{'':<{width}}   made by: {', '.join(g['producers']) or '-'}")
            click.echo(f"{'':<{width}}   read by: {', '.join(g['consumers']) or '- (a graph output)'}")
    if len(shown) < len(groups):
        click.echo(f"... {len(groups) - len(shown)} more groups (--all lists them with their layers)")
    click.echo(textwrap.fill(f"* {info['group_macs']}", 110))


@cli.command()
@click.argument("model", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Pruned model path.")
@click.option("--calib", required=True, metavar="SRC", help=".npz, .npy, image folder, or random:N.")
@click.option("--criterion", type=click.Choice(list(api.CRITERIA)), default="auto", show_default=True,
              help="aofp: the paper's search; descent (a target): one ablation per channel ranks each layer, the "
                   "output error sets the widths; oracle: exact ablations at the outputs (slow); l1, random; auto: "
                   "descent with a target where its ranking costs at most 256 forwards of the model, else aofp.")
@click.option("--flops-target", type=float, help="Fraction of the original MACs to keep (0.5 = half).")
@click.option("--threshold", type=float, default=None,  # search.DEFAULT_THRESHOLD, OUTPUT_THRESHOLD (tested)
              help="AOFP damage threshold (x1.25 whenever a target needs more; lower: slower, cuts by damage) "
                   "[default: 0.01; 0.001 when halves are accepted by the output error].")
@click.option("--trials-per-half", type=int, default=None, help="AOFP trials before ranking a half [default: 8].")
@click.option("--max-trials", type=int, default=None, help="Stop the search after this many trial rounds.")
@click.option("--oracle-step", type=int, default=None, help="Oracle: channels removed per re-ranking.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--calib-limit", type=int, default=None, help="Use at most this many calibration samples.")
@click.option("--latency-target", type=float, help="Fraction of the measured latency to keep (0.6 = 60 %), on "
              "--provider at --latency-batch, through a latency table measured on this machine (cached).")
@click.option("--latency-batch", type=int, default=None, help="Batch of the latency table and of the before/after "
              "timing [default: --batch-size].")
@click.option("--threads", type=int, default=None, help="onnxruntime intra-op threads for the latency measurements "
              "[default: onnxruntime's].")
@click.option("--round-to", default="auto", show_default=True, metavar="K|auto",
              help="Round widths to a multiple of K (8 for TensorRT FP16); auto: the multiple the provider's kernels "
                   "reward, measured (latency table).")
@click.option("--round-by", type=click.Choice(["auto", "scores", "output"]), default="auto", show_default=True,
              help="What decides which groups give up or take back a rounding step to land on the target: the "
                   "criterion's scores, or the cut's output error (one forward per group per step); auto: output on "
                   "a classifier.")
@click.option("--min-channels", type=int, default=1, show_default=True)
@provider_option
@click.option("--seed", type=int, default=0, show_default=True)
@shape_option
@click.option("--plan-out", type=click.Path(), help="Write the plan (kept channels per group) here.")
@click.option("--report", "report_path", type=click.Path(), help="Write the JSON report here.")
@click.option("--eval", "eval_src", metavar="SRC", help="Labelled data (.npz with 'labels'): accuracy before/after.")
@click.option("--plot", type=click.Path(), help="Write a PNG of the widths per group before/after.")
@click.option("--no-latency", is_flag=True, help="Skip timing the original and the pruned model.")
@verify_samples_option
@progress_option
@click.option("--checkpoint", type=click.Path(), help="AOFP: save the search state here after every round "
              "[default: OUTPUT.search-state.npz; removed when the search ends].")
@click.option("--resume", type=click.Path(), help="AOFP: continue the search saved in this state file.")
@click.option("--estimator", type=click.Choice(["mean", "ridge"]), default=None,
              help="AOFP: per-channel damage from the trials, the paper's mean or a ridge fit to the trial masks "
                   "[default: mean, the paper's; see README].")
@click.option("--damage-at", type=click.Choice(["auto", "next", "block", "output"]), default=None,
              help="AOFP: read a trial's damage at the next layers (the paper's), at the first channel-mixing "
                   "layer after them, or at the model outputs; auto: output on a one-output model whose output "
                   "trials cost at most 8x next's in MACs, else next [default: auto; see README].")
@click.option("--damage-norm", type=click.Choice(["auto", "sample", "batch"]), default=None,
              help="AOFP: a trial's damage relative per sample, averaged over the samples, or over the whole batch "
                   "(the paper's, where high-energy samples dominate); auto: per sample on a classifier (every "
                   "output [N, C]), else over the batch [default: auto; see README].")
@click.option("--accept-by", type=click.Choice(["auto", "estimate", "output"]), default=None,
              help="AOFP: prune a half when its damage estimated from the trials is under --threshold (the "
                   "paper's), or when the cut with it stays under --threshold at the model outputs, against the "
                   "original (one forward per candidate; halves of different layers on one scale); auto: output "
                   "on a classifier whose trials read the next layers, unless --reconstruct refits the cut, else "
                   "estimate [default: estimate; see README].")
@reconstruct_option
@click.option("--finetune-steps", type=int, default=0, show_default=True,
              help="Training-time AOFP: fine-tune the base path this many steps after every half (needs --data).")
@click.option("--data", "finetune_data", metavar="SRC", help="Training data for --finetune-steps "
              "(a .npz with 'labels' trains on the labels, else distillation from the original).")
@click.option("--finetune-lr", type=float, default=1e-3, show_default=True)
@click.option("--finetune-batch-size", type=int, default=32, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Fine-tuning device (auto: CUDA when torch sees a GPU).")
@click.option("--devices", metavar="LIST", help="AOFP: share each round's trials between sessions, one per device: "
              "cuda:0,cuda:1 (one per GPU) or cpu,cpu (CPU sessions splitting the cores); same plan as one device.")
@image_options
def prune(model, output, calib, criterion, flops_target, threshold, trials_per_half, max_trials, oracle_step,
          batch_size, calib_limit, latency_target, latency_batch, threads, round_to, round_by, min_channels,
          provider, seed, input_shape, plan_out, report_path, eval_src, plot, no_latency, verify_samples,
          no_progress, checkpoint, resume, estimator, damage_at, damage_norm, accept_by, reconstruct, finetune_steps,
          finetune_data, finetune_lr, finetune_batch_size, device, devices, **img):
    """Find the filters to remove (AOFP by default), cut them, verify, and write OUTPUT."""
    shapes = parse_input_shapes(list(input_shape))
    checkpoint = checkpoint or f"{output}.search-state.npz"
    api.check_outputs(model, {"--output": output, "--plan-out": plan_out, "--report": report_path, "--plot": plot,
                              "--checkpoint": checkpoint})
    if plot:
        from .plot import require_matplotlib

        require_matplotlib()
    search_options = {}
    aofp = criterion in ("aofp", "auto")  # auto: AOFP's options given decide for it (criteria.resolve_auto)
    if aofp or criterion == "oracle":
        search_options = {k: v for k, v in (("threshold", threshold), ("trials_per_half", trials_per_half),
                                            ("max_trials", max_trials)) if v is not None}
    if criterion == "oracle":
        search_options.update(oracle_step=oracle_step)
    if aofp or criterion == "descent":  # where a trial's (or an ablation's) damage is read
        search_options.update({k: v for k, v in (("damage_at", damage_at), ("damage_norm", damage_norm)) if v})
    if aofp:
        search_options.update(checkpoint=checkpoint)
        search_options.update({k: v for k, v in (("estimator", estimator), ("accept_by", accept_by),
                                                 ("resume", resume)) if v})
    if devices:
        search_options.update(devices=devices)
    if finetune_steps:
        from .finetune import Options

        search_options.update(finetune_steps=finetune_steps, finetune_data=finetune_data,
                              finetune_options=Options(lr=finetune_lr, batch_size=finetune_batch_size, device=device,
                                                       seed=seed))
    try:
        rep = api.prune(model, output, calib=calib, criterion=criterion, flops_target=flops_target,
                        latency_target=latency_target, latency_batch=latency_batch, threads=threads,
                        round_to=round_to, round_by=round_by, min_channels=min_channels, provider=provider, seed=seed,
                        input_shapes=shapes, plan_out=plan_out, batch_size=batch_size, calib_limit=calib_limit,
                        image_options=parse_image_options(img), eval_src=eval_src, reconstruct=reconstruct,
                        latency=not no_latency, verify_samples=verify_samples, progress=not no_progress,
                        **search_options)
    except KeyboardInterrupt:
        if criterion in ("aofp", "auto") and os.path.exists(checkpoint):
            raise Interrupted(f"interrupted; nothing written. The search state is in {checkpoint}: continue with "
                              f"the same command plus --resume {checkpoint}") from None
        raise
    if rep is None:  # torchrun: rank 0 reports
        return
    if plot:
        from .plot import plot_widths

        plot_widths(rep, plot)
    if report_path:
        _write_json(report_path, rep)
    for line in cut_lines(rep):
        click.echo(line)
    show_fidelity(rep, prune_hints(rep, reconstruct=reconstruct, flops_target=flops_target))
    click.echo(f"wrote {output}")


@cli.command()
@click.argument("model", type=click.Path())
@click.option("--plan", "plan_path", required=True, type=click.Path(), help="Plan JSON (from prune --plan-out).")
@click.option("-o", "--output", required=True, type=click.Path())
@click.option("--calib", metavar="SRC", help="Data for verification (default: seeded noise); --reconstruct needs it.")
@click.option("--report", "report_path", type=click.Path(), help="Write the JSON report here.")
@click.option("--eval", "eval_src", metavar="SRC", help="Labelled data (.npz with 'labels'): accuracy before/after.")
@provider_option
@shape_option
@reconstruct_option
@verify_samples_option
@progress_option
def apply(model, plan_path, output, calib, report_path, eval_src, provider, input_shape, reconstruct, verify_samples,
          no_progress):
    """Cut MODEL as PLAN says, verify, [reconstruct,] and write OUTPUT."""
    api.check_outputs(model, {"--output": output, "--report": report_path})
    rep = api.apply_plan(model, plan_path, output, calib=calib, input_shapes=parse_input_shapes(list(input_shape)),
                         provider=provider, reconstruct=reconstruct, eval_src=eval_src, verify_samples=verify_samples,
                         progress=not no_progress)
    if report_path:
        _write_json(report_path, rep)
    for line in cut_lines(rep):
        click.echo(line)
    hints = ("--reconstruct (a training-free least-squares re-fit)",) if not reconstruct else ()
    show_fidelity(rep, hints + ("a plan with a milder target", "fine-tuning the result (aofp-onnx finetune)"))
    click.echo(f"wrote {output}")


@cli.command()
@click.argument("original", type=click.Path())
@click.argument("pruned", type=click.Path())
@click.option("--plan", "plan_path", required=True, type=click.Path())
@click.option("--calib", metavar="SRC", help="Data to compare on (default: seeded noise).")
@provider_option
@shape_option
@verify_samples_option
def verify(original, pruned, plan_path, calib, provider, input_shape, verify_samples):
    """Check PRUNED against ORIGINAL with the plan's removed channels zeroed at their consumers (exit 3 if not)."""
    v = api.verify_plan(original, pruned, plan_path, calib=calib, input_shapes=parse_input_shapes(list(input_shape)),
                        provider=provider, verify_samples=verify_samples)
    click.echo(f"{'passed' if v.passed else 'FAILED'}: max abs diff {v.max_abs_diff:.3g} "
               f"(relative {v.max_rel_diff:.3g}), verified on {v.samples} samples ({v.provider}) {v.detail}".rstrip())
    if not v.passed:
        raise VerificationError("verification failed: the pruned model is not the original with the plan's "
                                "channels removed")


finetune_options = options_of([
    click.option("--epochs", type=int, default=3, show_default=True),
    click.option("--lr", type=float, default=1e-4, show_default=True,
                 help="Adam learning rate, cosine decay (1e-3 for a model cut far below the original)."),
    click.option("--batch-size", "ft_batch_size", type=int, default=32, show_default=True),
    click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                 help="Training device (auto: CUDA when torch sees a GPU)."),
    click.option("--bn", type=click.Choice(["frozen", "update"]), default="frozen", show_default=True,
                 help="BatchNormalization statistics: kept, or updated from the training batches."),
])


@cli.command()
@click.argument("pruned", type=click.Path())
@click.option("--teacher", type=click.Path(), help="The original model: its outputs are the distillation targets.")
@click.option("--data", required=True, metavar="SRC", help="Training inputs (.npz, .npy, image folder); "
              "a .npz with 'labels' (or --mode supervised) trains on the labels.")
@click.option("-o", "--output", required=True, type=click.Path())
@click.option("--mode", type=click.Choice(["auto", "distill", "supervised", "trainer"]), default="auto",
              show_default=True, help="auto: --trainer if given, supervised when the data has labels, else distill.")
@click.option("--trainer", metavar="MODULE:FUNCTION", help="Your training function, called as "
              "fn(module, data[, teacher=, options=, device=]) on the torch module of the pruned graph.")
@click.option("--val", metavar="SRC", help="Validation data for keeping the best epoch (default: 10% of --data).")
@click.option("--eval", "eval_src", metavar="SRC", help="Labelled data (.npz with 'labels'): accuracy before/after.")
@click.option("--bridge", default="torch", show_default=True, help="Fine-tuning bridge (entry point name).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--report", "report_path", type=click.Path(), help="Write the JSON report here.")
@progress_option
@provider_option
@shape_option
@image_options
@finetune_options
def finetune(pruned, teacher, data, output, mode, trainer, val, eval_src, bridge, seed, report_path, no_progress,
             provider, input_shape, epochs, lr, ft_batch_size, device, bn, **img):
    """Fine-tune PRUNED and write the same graph with the trained weights to OUTPUT."""
    from .finetune import Options

    api.check_outputs(pruned, {"--output": output, "--report": report_path})
    options = Options(epochs=epochs, lr=lr, batch_size=ft_batch_size, device=device, bn=bn, seed=seed,
                      trainer=trainer, progress=not no_progress)
    rep = api.finetune(pruned, output, data=data, teacher=teacher, val=val, mode=mode, options=options,
                       bridge=bridge, provider=provider, input_shapes=parse_input_shapes(list(input_shape)),
                       image_options=parse_image_options(img), eval_src=eval_src, progress=not no_progress)
    if rep is None:  # torchrun: rank 0 reports
        return
    if report_path:
        _write_json(report_path, rep)
    click.echo("\n".join(finetune_lines(rep, options.epochs)))
    show_fidelity(rep, ("more --epochs or another --lr", "a milder cut before fine-tuning"), model="fine-tuned")
    click.echo(f"wrote {output}")


@cli.command()
@click.argument("models", nargs=-1, required=True, type=click.Path())
@provider_option
@click.option("--batch-size", "batch_sizes", default=None, metavar="B[,B..]",
              help="Batch size(s) for a dynamic batch dim [default: the --input-shape's, else 1].")
@click.option("--repeats", type=int, default=50, show_default=True)
@click.option("--warmup", type=int, default=5, show_default=True)
@click.option("--threads", type=int, default=None, help="intra-op threads (default: onnxruntime's).")
@click.option("--input-shape", "input_shape", multiple=True, metavar="NAME:D0,D1,..",
              help="Fix an input's dims; give a name several times to bench several shapes.")
@click.option("--json", "json_out", type=click.Path(), help="Write the timings as JSON here.")
def bench(models, provider, batch_sizes, repeats, warmup, threads, input_shape, json_out):
    """Latency of one or more models side by side (interleaved runs, medians), ratios against the first."""
    from .bench import bench_models, bench_table

    if json_out:
        for m in models:
            api.check_output_path(m, json_out)
    batches = None
    if batch_sizes:
        try:
            batches = [int(b) for b in batch_sizes.split(",")]
        except ValueError:
            raise InputError(f"--batch-size: expected B or B,B,.., got {batch_sizes!r}") from None
    shapes = [next(iter(parse_input_shapes([v]).items())) for v in input_shape]
    rows = bench_models(list(models), provider=provider, batch_size=batches, repeats=repeats, warmup=warmup,
                        threads=threads, input_shapes=shapes)
    if json_out:
        _write_json(json_out, rows)
    click.echo("\n".join(bench_table(rows, len(models), repeats)))


def main(argv=None):
    try:
        cli.main(args=argv, prog_name="aofp-onnx", standalone_mode=False)
    except InputError as exc:
        click.echo(f"aofp-onnx: error: {exc}", err=True)
        sys.exit(2)
    except VerificationError as exc:
        click.echo(f"aofp-onnx: {exc}", err=True)
        sys.exit(3)
    except Interrupted as exc:
        click.echo(f"aofp-onnx: {exc}", err=True)
        sys.exit(130)
    except click.exceptions.Abort:
        click.echo("aofp-onnx: interrupted; nothing written", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("aofp-onnx: interrupted; nothing written", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"aofp-onnx: error: {exc.format_message()}", err=True)
        sys.exit(2)
    except SystemExit:
        raise
    except Exception as exc:
        if os.environ.get("AOFP_ONNX_DEBUG"):
            traceback.print_exc()
        click.echo(f"aofp-onnx: internal error: {type(exc).__name__}: {exc}", err=True)
        sys.exit(1)
    sys.exit(0)
