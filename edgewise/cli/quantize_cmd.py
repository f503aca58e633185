"""``edgewise model quantize`` and ``edgewise model check``: make an int8 model and see what it
costs, before publishing it. The work is in :mod:`edgewise.compress`; this is the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from edgewise.cli.connect import fail
from edgewise.cli.keys_cmd import err, out
from edgewise.compress.check import DEFAULT_RUNS, DEFAULT_WARMUP, CheckReport, ModelFigures
from edgewise.compress.errors import CompressError
from edgewise.compress.quantize import Mode, QuantizeResult

SAMPLES_HELP = (
    ".npz with x [N, *sample] in the model's input dtype (or images / inputs) and y [N] integer "
    "labels (or labels); docs/compression.md"
)


def _progress(label: str) -> Progress:
    return Progress(
        TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=err, transient=True,
    )  # fmt: skip


def quantize(
    model: Annotated[Path, typer.Argument(help="The float ONNX model (IN.onnx).", dir_okay=False)],
    output: Annotated[
        Path, typer.Argument(help="Where to write the int8 model (OUT.onnx; never IN).")
    ],
    calibration: Annotated[
        Path,
        typer.Option(
            "--calibration", help=f"Sample inputs for calibration and the check. {SAMPLES_HELP}"
        ),
    ],
    mode: Annotated[
        str,
        typer.Option(
            "--mode",
            help="static (QDQ, calibrated activations: conv nets), dynamic (int8 weights, "
            "activations at run time: MLPs) or auto (static if the graph has a Conv).",
        ),
    ] = "auto",
    batch: Annotated[
        int, typer.Option("--batch", min=1, max=4096, help="Calibration batch size.")
    ] = 32,
) -> None:
    """Quantize an ONNX model to int8 with ONNX Runtime's tools.

    Conv nets get static QDQ quantization (activation ranges calibrated on --calibration, after
    ORT's pre-processing); MLPs get dynamic quantization. OUT is written only once the int8 model
    loads and has run on the calibration samples (temp file, fsync, rename): then compare it with
    `edgewise model check OUT --reference IN --labelled FILE`.
    """
    from edgewise.compress.quantize import MODES, quantize_model

    if mode not in MODES:
        fail(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
    chosen: Mode = "static" if mode == "static" else "dynamic" if mode == "dynamic" else "auto"
    try:
        with _progress("calibrating") as progress:
            task = progress.add_task("calibrating", total=None, visible=False)
            result = quantize_model(
                model,
                output,
                calibration,
                mode=chosen,
                batch=batch,
                on_total=lambda n: progress.update(task, total=n, visible=True),
                on_batch=lambda: progress.advance(task),
            )
    except CompressError as exc:
        fail(str(exc))
    _print_quantized(result)


def _print_quantized(r: QuantizeResult) -> None:
    weights = "per-channel" if r.per_channel else "per-tensor"
    kind = (
        f"static int8 (QDQ, {weights} weights, calibrated uint8 activations)"
        if r.mode == "static"
        else "dynamic int8 (int8 weights, activations quantized at run time)"
    )
    out.print(f"wrote {r.output}: {kind}; {r.why}", soft_wrap=True)
    change = f"{r.ratio:.2f}x smaller" if r.ratio > 1 else f"{1 / r.ratio:.2f}x LARGER"
    out.print(f"  size       {r.source_bytes:,} -> {r.output_bytes:,} bytes ({change})")
    out.print(
        f"  agreement  {r.agreeing}/{r.samples} calibration samples ({r.agreement:.2%}) get the "
        "float model's label"
    )
    if r.output_bytes >= r.source_bytes:
        err.print(
            f"[yellow]warning:[/] the int8 model is not smaller: {r.source} has too few weights "
            "for int8 to outweigh the quantization nodes it adds; keep the float model",
            soft_wrap=True,
        )
    out.print(
        f"next: edgewise model check {r.output} --reference {r.source} --labelled LABELLED.npz",
        soft_wrap=True,
    )


def check(
    model: Annotated[
        Path,
        typer.Argument(
            help="The model to measure (any file a node loads, e.g. .onnx).", dir_okay=False
        ),
    ],
    labelled: Annotated[Path, typer.Option("--labelled", help=f"Labelled samples. {SAMPLES_HELP}")],
    reference: Annotated[
        Path | None,
        typer.Option(
            "--reference", help="The model to compare with (e.g. the float model it came from)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    runs: Annotated[
        int, typer.Option("--runs", min=1, max=100_000, help="Timed runs per batch size.")
    ] = DEFAULT_RUNS,
    warmup: Annotated[
        int, typer.Option("--warmup", min=0, max=10_000, help="Untimed runs before them.")
    ] = DEFAULT_WARMUP,
    threads: Annotated[
        int, typer.Option("--threads", min=1, max=64, help="Intra-op threads (node default: 1).")
    ] = 1,
) -> None:
    """Size, accuracy, agreement with --reference and latency of a model, at a glance.

    Size on disk (and the ratio to the reference), accuracy on --labelled, the share of samples
    where MODEL and --reference give the same label, and latency at batch 1 and 32 (p50 and p99
    of --runs runs after --warmup runs), with the node's runtime for the file's type.
    """
    from edgewise.compress.check import check_models

    try:
        with _progress("timing") as progress:
            task = progress.add_task("timing", total=None, visible=False)
            report = check_models(
                model,
                labelled,
                reference=reference,
                runs=runs,
                warmup=warmup,
                threads=threads,
                on_total=lambda n: progress.update(task, total=n, visible=True),
                on_run=lambda: progress.advance(task),
            )
    except CompressError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
        return
    out.print(_table(report, runs, warmup, threads))


def _table(r: CheckReport, runs: int, warmup: int, threads: int) -> Table:
    models = [r.model] + ([r.reference] if r.reference else [])
    table = Table(
        "",
        *(Path(m.path).name for m in models),
        title=f"{r.samples:,} labelled samples from {r.labelled}",
        caption=f"latency: {runs} timed runs after {warmup} warm-up, {threads} thread(s)",
    )
    ref = r.reference
    size = [f"{m.bytes:,} B" for m in models]
    accuracy = [f"{m.accuracy:.2%} ({m.correct:,}/{r.samples:,})" for m in models]
    if ref is not None and r.size_ratio is not None and r.agreement is not None:
        ratio = r.size_ratio
        size[0] += f" ({ratio:.2f}x smaller)" if ratio >= 1 else f" ({1 / ratio:.2f}x larger)"
        change_pt = (r.model.accuracy - ref.accuracy) * 100
        accuracy[0] += f", {change_pt:+.2f} pt"
    table.add_row("size", *size)
    table.add_row("accuracy", *accuracy)
    if r.agreement is not None and r.agreeing is not None:
        table.add_row(
            "same label as reference", f"{r.agreement:.2%} ({r.agreeing:,}/{r.samples:,})", "-"
        )
    for batch in sorted({lat.batch for m in models for lat in m.latency}):
        table.add_row(f"latency batch {batch} (p50 / p99)", *(_latency(m, batch) for m in models))
    table.add_row("runtime", *(f"{m.backend} {m.provider}" for m in models))
    table.add_row("input", *(m.input for m in models))
    return table


def _latency(m: ModelFigures, batch: int) -> str:
    for lat in m.latency:
        if lat.batch == batch:
            return f"{lat.p50_ms:.3f} / {lat.p99_ms:.3f} ms"
    return "n/a (fixed batch size)"
