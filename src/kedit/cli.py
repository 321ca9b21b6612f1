"""The `kedit` command: a thin layer over the Python API."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from kedit.files import read_text

app = typer.Typer(
    help="Locate, edit, erase and explain knowledge inside transformer language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
zoo_app = typer.Typer(help="The bundled tiny models.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")
console = Console()


@app.callback()
def main(
    ctx: typer.Context,
    threads: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Torch CPU threads for every command (also $KEDIT_THREADS). Default: one for "
            "models under 50M parameters (the bundled ones), torch's default for larger ones.",
        ),
    ] = None,
) -> None:
    """Locate, edit, erase and explain knowledge inside transformer language models."""
    if threads is not None:
        from kedit.lm import using_threads

        ctx.with_resource(using_threads(threads))


DEMO_MODEL = "tiny-gpt2"
USER_ERRORS = (
    ValueError,
    TypeError,
    KeyError,
    FileNotFoundError,
    FloatingPointError,  # an edit whose weights would not be finite (the model is left as it was)
    json.JSONDecodeError,
    yaml.YAMLError,
)


def friendly_errors(command: Callable) -> Callable:
    """Turn bad input into one clear line on stderr and exit code 2, without a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except USER_ERRORS as exc:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            # One line however long: the terminal wraps it, rich does not break it.
            Console(stderr=True).print(
                f"[red]error:[/red] {message}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(2) from None

    return wrapper


def parse_hparams(pairs: list[str] | None, path: Path | None) -> dict[str, Any]:
    """Hyper-parameters from a YAML file and `key=value` pairs (values parsed as YAML)."""

    def parse(text: str, where: str) -> Any:
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as error:
            problem = getattr(error, "problem", None) or "not valid YAML"
            raise ValueError(f"{where}: {problem}") from error

    values: dict[str, Any] = {}
    if path is not None:
        loaded = parse(read_text(path, "--hparams-file"), f"--hparams-file {str(path)!r}") or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"--hparams-file: {str(path)!r} must hold a mapping of keys to values")
        values.update(loaded)
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--hparam: expected key=value, got {pair!r}")
        values[key.strip()] = parse(raw, f"--hparam {pair!r}")
    return values


def show_predictions(predictions: list[tuple[str, float]], title: str) -> None:
    table = Table(title=title, title_justify="left")
    table.add_column("next token")
    table.add_column("probability", justify="right")
    for token, prob in predictions:
        table.add_row(repr(token), f"{prob:.3f}")
    console.print(table)


def show_metrics(result: dict[str, Any]) -> None:
    table = Table(title="Metrics", title_justify="left")
    for column in ("stage", "protocol", "metric", "value"):
        table.add_column(column, justify="right" if column == "value" else "left")
    for stage in ("pre", "post"):
        for protocol, metrics in (result.get(stage) or {}).items():
            for name, value in metrics.items():
                shown = f"{value:.3f}" if isinstance(value, (int, float)) else str(value)
                table.add_row(stage, protocol, name, shown)
    console.print(table)


def _edit_and_show(lm: Any, request: Any, method: str, hparams: dict[str, Any]) -> Any:
    """Edit and print the top predictions before and after, and the metrics. Nothing is printed
    before the edit has succeeded, so bad input gives only its error line."""
    import kedit
    from kedit.lm import top_next_tokens
    from kedit.methods.registry import resolve_hparams

    params = resolve_hparams(method, lm, hparams)
    before = top_next_tokens(lm, request.text)
    started = time.perf_counter()
    edit = kedit.edit(lm, request, method=method, hparams=params)
    seconds = time.perf_counter() - started
    console.print(f"[bold]{request.text}[/bold] -> {request.target_new!r} ({method}, {lm.name})")
    show_predictions(before, "Before the edit")
    show_predictions(top_next_tokens(lm, request.text), f"After the edit ({seconds:.2f} s)")
    show_metrics(kedit.evaluate(lm, request, edit=edit))
    return edit


def given_on_command_line(ctx: typer.Context, name: str) -> bool:
    """Whether option `name` was typed, not defaulted."""
    # Compared by name: recent typer vendors its own click, whose enum is not click's.
    return getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"


def easyedit_names(
    ctx: typer.Context, hparams: dict[str, Any], method: str, model: str
) -> tuple[str, str]:
    """The method and model: an EasyEdit file's `alg_name` and `model_name` choose them where
    --method and --model are not given (a given --method must agree with `alg_name`)."""
    from kedit.methods.registry import method_for_alg_name

    if "alg_name" in hparams and not given_on_command_line(ctx, "method"):
        method = method_for_alg_name(hparams["alg_name"], hparams)
    if "model_name" in hparams and not given_on_command_line(ctx, "model"):
        model = hparams["model_name"]
        if not isinstance(model, str) or not model:
            raise ValueError(f"model_name: expected a model name, folder or hub id, got {model!r}")
    return method, model


ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Bundled name, folder or hub id.")]
MethodOpt = Annotated[str, typer.Option("--method", help="Editing method (`kedit methods`).")]
HparamOpt = Annotated[
    list[str] | None, typer.Option("--hparam", "-p", help="Override a hyper-parameter: key=value.")
]
HparamFileOpt = Annotated[
    Path | None, typer.Option("--hparams-file", help="YAML file of hyper-parameters.")
]


@app.command()
@friendly_errors
def demo(
    model: ModelOpt = DEMO_MODEL,
    method: MethodOpt = "rome",
    case: Annotated[
        int | None,
        typer.Option(
            help="Benchmark case to edit (default: the first; for a model trained on tinyworld 2, "
            "the first that asks a two-hop question, whose answer should follow the edit)."
        ),
    ] = None,
) -> None:
    """Edit one fact of the bundled tinyworld benchmark and show before/after."""
    import kedit
    from kedit import zoo
    from kedit.data import load_requests
    from kedit.zoo import benchmark_path

    requests = load_requests(benchmark_path("knowedit"))
    if case is not None and not 0 <= case < len(requests):
        raise ValueError(f"--case: {case} is out of range 0..{len(requests) - 1}")
    lm = kedit.load(model)
    chat = "dialogue" in zoo.abilities(zoo.model_info(lm.recipe) if lm.recipe else {})
    if case is None:
        reasoning = (
            i for i, r in enumerate(requests) if "Reasoning" in r.extra.get("portability_kinds", ())
        )
        case = next(reasoning, 0) if chat else 0
    request = requests[case]
    kinds = request.extra.get("portability_kinds", ())
    probes = [(f"Two-hop: {p.prompt}", p.prompt, p.answer) for p, kind in
              zip(request.portability, kinds, strict=False) if kind == "Reasoning"]  # fmt: skip
    if chat:
        from kedit.zoo.chatworld import dialogue_question

        question = dialogue_question(request.template, request.subject)
        if question is not None:
            probes.append((f"In dialogue: {question!r}", question, request.target_new))
    before = [top_prediction(lm, prompt) for _, prompt, _ in probes]
    edit = _edit_and_show(lm, request, method, {})
    for (label, prompt, implied), was in zip(probes, before, strict=True):
        now = top_prediction(lm, prompt)
        console.print(f"{label} {was!r} -> {now!r} (the edit implies {implied!r})", highlight=False)
    edit.undo()
    console.print("Edit undone; the model is as it was.")


def top_prediction(lm: Any, prompt: str) -> str:
    from kedit.lm import top_next_tokens

    return top_next_tokens(lm, prompt, k=1)[0][0]


@app.command("edit")
@friendly_errors
def edit_command(
    ctx: typer.Context,
    prompt: Annotated[str, typer.Option(help="Prompt, with {} for the subject or containing it.")],
    subject: Annotated[str, typer.Option(help="The subject whose fact changes.")],
    target: Annotated[str, typer.Option(help="The new target, e.g. ' Lisbon'.")],
    model: ModelOpt = DEMO_MODEL,
    method: MethodOpt = "rome",
    hparam: HparamOpt = None,
    hparams_file: HparamFileOpt = None,
    save: Annotated[Path | None, typer.Option(help="Write the edit to this .kedit file.")] = None,
    target_true: Annotated[
        str | None, typer.Option(help="The current answer, e.g. ' Paris' (KN needs it).")
    ] = None,
    editor: Annotated[
        Path | None, typer.Option(help="A trained editor's folder (mend, malmen, serac).")
    ] = None,
) -> None:
    """Edit one fact and print the top predictions before and after."""
    import kedit
    from kedit.edits import writable_edit_path

    request = kedit.EditRequest(
        prompt=prompt, subject=subject, target_new=target, target_true=target_true
    )
    if not target[0].isspace() and not request.text[-1:].isspace():
        Console(stderr=True).print(
            f"note: --target {target!r} has no leading space; after a prompt, tokenizers such as "
            f"GPT-2's and Llama's expect {' ' + target!r} (the target is used as given)",
            highlight=False,
        )
    hparams = parse_hparams(hparam, hparams_file)
    method, model = easyedit_names(ctx, hparams, method, model)
    if editor is not None:
        hparams["editor"] = str(editor)
    if save is not None:
        writable_edit_path(save, "--save")
    lm = kedit.load(model)
    edit = _edit_and_show(lm, request, method, hparams)
    if save is not None:
        console.print(f"Saved the edit to {edit.save(save)}")


bench_app = typer.Typer(
    help="Run benchmarks; `kedit bench merge` combines shards.", no_args_is_help=True
)
app.add_typer(bench_app, name="bench")


def bench_progress(console: Console, get_time: Callable[[], float] | None = None) -> Progress:
    """The bench progress bar: the run, cases done of all, time spent and time left (from the
    speed of this run's cases; `get_time` is the clock, by default rich's)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("cases"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        speed_estimate_period=600,  # a case can take minutes on a large model
        get_time=get_time,
    )


@bench_app.callback(invoke_without_command=True)
@friendly_errors
def bench(
    ctx: typer.Context,
    data: Annotated[
        Path | None, typer.Option(help="Benchmark file (any supported format).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder; re-running resumes.")] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML plan: models x methods x datasets ...")
    ] = None,
    model: ModelOpt = DEMO_MODEL,
    method: MethodOpt = "rome",
    n: Annotated[int | None, typer.Option(help="Use the first N cases.")] = None,
    mode: Annotated[str, typer.Option(help="independent, batch or sequential.")] = "independent",
    batch_size: Annotated[int, typer.Option(help="Cases per edit (batch, sequential).")] = 1,
    schedule: Annotated[
        str, typer.Option(help="Sequential evaluation: after-each or after-all.")
    ] = "after-each",
    checkpoint_every: Annotated[
        int, typer.Option(help="Sequential: re-evaluate everything every K edits (0: never).")
    ] = 0,
    protocol: Annotated[
        list[str] | None,
        typer.Option(help="teacher_forced, probability, generation; sampling adds fluency."),
    ] = None,
    contexts: Annotated[
        int, typer.Option(help="Unrelated sentences per case for the robustness metric.")
    ] = 3,
    seeds: Annotated[int, typer.Option(help="Seeds to run; numbers report mean \\[min, max].")] = 3,
    shard: Annotated[str, typer.Option(help="Run only shard i of n, written i/n.")] = "0/1",
    format: Annotated[
        str | None, typer.Option(help="The --data file's format, where it is not detected.")
    ] = None,
    hparam: HparamOpt = None,
    hparams_file: HparamFileOpt = None,
) -> None:
    """Run a benchmark: edit, evaluate (pre and post), undo; results stream to --out."""
    from kedit.bench.plan import Plan, load_plan, run_plan
    from kedit.data import check_format

    if ctx.invoked_subcommand is not None:
        return
    if out is None:
        raise ValueError("--out: give the output folder of the run")
    if config is not None:
        given = [
            "--" + key.replace("_", "-")
            for key in ctx.params
            if key not in ("out", "config", "shard") and given_on_command_line(ctx, key)
        ]
        if given:
            raise ValueError(
                f"--config: the plan file sets the run; {', '.join(given)} would be ignored, "
                "so put them in the plan or drop --config"
            )
        plan = load_plan(config)
    else:
        if data is None:
            from kedit.zoo import DATA_DIR

            raise ValueError(
                "--data: give a benchmark file, or a plan with --config (the bundled tinyworld "
                f"benchmark: {DATA_DIR / 'tinyworld_knowedit.json'})"
            )
        if not data.is_file():
            raise FileNotFoundError(f"--data: {str(data)!r} does not exist")
        if format is not None:
            check_format(format, "--format")
        hparams = parse_hparams(hparam, hparams_file)
        method, model = easyedit_names(ctx, hparams, method, model)
        plan = Plan(
            models=[model],
            methods=[method],
            datasets=[str(data)],
            modes=[
                {
                    "mode": mode,
                    "batch_size": batch_size,
                    "schedule": schedule,
                    "checkpoint_every": checkpoint_every,
                }
            ],
            protocols=protocol or ["teacher_forced"],
            hparams={method: hparams},
            n=n,
            seeds=seeds,
            contexts=contexts,
            formats={str(data): format} if format else {},
        )
    plan.configs(shard)
    with bench_progress(console) as bar:
        task = bar.add_task("benchmark", total=None)
        aggregate = run_plan(
            plan,
            out,
            shard=shard,
            on_case=lambda _: bar.advance(task),
            on_run=lambda label: bar.update(task, description=label),
            # Cases done by an earlier run count as done, not as speed: the ETA is this run's.
            on_start=lambda total, done: bar.reset(task, total=total, completed=done),
        )
    for run in aggregate["runs"]:
        title = f"{run['model']} / {run['method']} / {run['dataset']} / {run['mode']}"
        show_summary(run["metrics"], f"{title}, {run['seeds']} seed(s)")
    console.print(f"report: {out / 'report.md'}; per-case results under {out}")


@bench_app.command("merge")
@friendly_errors
def bench_merge(
    folders: Annotated[list[Path], typer.Argument(help="Output folders of the shards.")],
    out: Annotated[Path, typer.Option(help="Folder for the merged run.")],
) -> None:
    """Combine the shards of one benchmark run (`--shard i/n`) into one."""
    from kedit.bench.plan import merge_shards

    summary = merge_shards(folders, out)
    show_summary({"metrics": summary["metrics"]}, f"merged {len(folders)} shards")


def show_summary(summary: dict[str, Any], title: str) -> None:
    """Means per stage, protocol and metric (a pitfalls run: per ConflictEdit kind or RoundEdit
    variant); with several seeds, [min, max] beside them."""
    table = Table(title=title, title_justify="left")
    for column in ("stage", "protocol", "metric", "mean"):
        table.add_column(column)
    metrics_by_stage = summary.get("metrics", summary)
    for stage in ("pre", "post", "pitfalls"):
        for name, metrics in (metrics_by_stage.get(stage) or {}).items():
            for metric, value in metrics.items():
                if isinstance(value, dict):
                    shown = f"{value['mean']:.3f}"
                    if value["n"] > 1:
                        shown += f" [{value['min']:.3f}, {value['max']:.3f}]"
                else:
                    shown = f"{value:.3f}"
                table.add_row(stage, name, metric, shown)
    console.print(table)


def hparams_markdown(method: str) -> str:
    """A method's hyper-parameters as a Markdown table, generated from its dataclass."""
    from kedit.methods.registry import get_method

    spec = get_method(method)
    lines = [f"### `{spec.name}`: {spec.summary}", "", "| hyper-parameter | default | help |"]
    lines.append("|---|---|---|")
    for field, (default, help_text) in spec.hparams.field_help().items():
        lines.append(f"| `{field}` | `{json.dumps(default)}` | {help_text} |")
    return "\n".join(lines) + "\n"


@app.command()
@friendly_errors
def methods(
    name: Annotated[str | None, typer.Argument(help="Show this method's hparams.")] = None,
    markdown: Annotated[bool, typer.Option(help="Print Markdown (for the docs).")] = False,
    model: Annotated[
        str | None,
        typer.Option(
            "--model", "-m", help=f"Show the values used for this model (default {DEMO_MODEL})."
        ),
    ] = None,
    hparam: HparamOpt = None,
    hparams_file: HparamFileOpt = None,
) -> None:
    """List the editing methods, or the hyper-parameters a method uses on a model and where each
    value comes from: the method's default, the model table (with its source), relative depth,
    the model's default corpus, or your override."""
    from rich.markup import escape

    from kedit.methods.registry import explain_hparams, get_method, list_methods

    if markdown:
        names = [name] if name else list_methods()
        typer.echo("\n".join(hparams_markdown(method) for method in names))
        return
    if name is None:
        table = Table("method", "batchable", "summary")
        for method in list_methods():
            spec = get_method(method)
            table.add_row(method, "yes" if spec.batchable else "no", spec.summary)
        console.print(table)
        return
    import kedit

    spec = get_method(name)
    lm = kedit.load(model or DEMO_MODEL)
    settings = explain_hparams(spec.name, lm, parse_hparams(hparam, hparams_file))
    title = f"{spec.name} on {lm.name}" + ("" if model else " (the CLI's default model; -m MODEL)")
    table = Table("hyper-parameter", "value", "from", "help", title=title, title_justify="left")
    notes: dict[str, int] = {}
    for field, (_, help_text) in spec.hparams.field_help().items():
        source = settings[field].source
        if source not in ("default", "override"):
            source = f"[{notes.setdefault(source, len(notes) + 1)}]"
        value = escape(json.dumps(settings[field].value))
        table.add_row(field, value, escape(source), escape(help_text))
    console.print(table)
    for source, number in notes.items():
        console.print(f"[{number}] {escape(source)}", highlight=False)


stats_app = typer.Typer(
    help="Second moments of MLP keys (ROME/MEMIT statistics): collect, list, import.",
    no_args_is_help=True,
)
app.add_typer(stats_app, name="stats")
CorpusOpt = Annotated[
    str | None,
    typer.Option(
        help="'tinyworld', a .txt/.jsonl/.parquet file or folder, a dataset saved with "
        "save_to_disk, or a hub dataset NAME[:CONFIG] (default: the model's: tinyworld for the "
        "bundled models, Wikitext-103 for others)."
    ),
]
MaxLengthOpt = Annotated[int, typer.Option(help="Token cap per document.")]


@stats_app.command("collect")
@friendly_errors
def stats_collect(
    layers: Annotated[str, typer.Option(help="Comma-separated layer indices, e.g. 1,2,3.")],
    model: ModelOpt = DEMO_MODEL,
    corpus: CorpusOpt = None,
    n_samples: Annotated[
        int, typer.Option("--n-samples", "-n", help="Maximum number of documents.")
    ] = 100_000,
    max_length: MaxLengthOpt = 256,
    dtype: Annotated[str, typer.Option(help="Accumulation dtype: float64 or float32.")] = "float64",
    batch_tokens: Annotated[
        int | None,
        typer.Option(
            help="Tokens per batch and rank (default: 8192 on a CPU; on GPUs what half the free "
            "memory holds)."
        ),
    ] = None,
    checkpoint_every: Annotated[
        int, typer.Option(help="Save partial sums every N batches (0: never).")
    ] = 200,
    device: Annotated[
        str | None, typer.Option(help="Model device, e.g. cuda (under torchrun: the rank's GPU).")
    ] = None,
) -> None:
    """Collect (or find cached) second moments of MLP keys for the given layers in one pass.

    An interrupted run resumes from its last saved partial sums.

    Under `torchrun --nproc_per_node N kedit stats collect ...` the ranks share the corpus.
    """
    import os

    import kedit
    from kedit.stats import second_moments, torchrun_group

    try:
        indices = [int(part) for part in layers.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--layers: expected comma-separated integers, got {layers!r}") from None
    with torchrun_group() as rank_device:
        lm = kedit.load(model, device=rank_device or device)
        started = time.perf_counter()
        moments = second_moments(
            lm,
            indices,
            corpus=corpus,
            n_samples=n_samples,
            max_length=max_length,
            dtype=dtype,
            batch_tokens=batch_tokens,
            checkpoint_every=checkpoint_every,
        )
    if os.environ.get("RANK", "0") == "0":
        for layer, moment in moments.items():
            module = lm.layout.mlp_out_name(layer)
            console.print(f"layer {layer} ({module}): {tuple(moment.shape)} {moment.dtype}")
        console.print(f"done in {time.perf_counter() - started:.2f} s")


@stats_app.command("list")
@friendly_errors
def stats_list() -> None:
    """Show the cached statistics: model, module, corpus, samples, tokens, dtype, size."""
    from kedit.stats import cache_dir, list_cached

    entries = list_cached()
    if not entries:
        console.print(f"No statistics cached in {cache_dir()}")
        return
    console.print(f"Statistics cached in {cache_dir()}")
    for fingerprint in sorted({entry["model_fingerprint"] for entry in entries}):
        mine = [entry for entry in entries if entry["model_fingerprint"] == fingerprint]
        names = ", ".join(sorted({entry.get("model", "?") for entry in mine}))
        table = Table(title=f"{names} (fingerprint {fingerprint})", title_justify="left")
        table.add_column("module", overflow="fold")
        table.add_column("corpus", overflow="fold")
        for column in ("samples", "max len", "tokens", "dtype", "size", "status"):
            table.add_column(column, justify="right", no_wrap=True)
        for entry in mine:
            table.add_row(
                entry["module"],
                entry["corpus"],
                f"{entry['n_samples']:,}",
                str(entry["max_length"]),
                f"{entry['tokens']:,}",
                entry["dtype"],
                f"{entry['bytes'] / 2**20:.1f} MiB",
                entry["status"],
            )
        console.print(table)


@stats_app.command("import")
@friendly_errors
def stats_import(
    file: Annotated[Path, typer.Argument(help="A ROME/MEMIT/EasyEdit second-moment .npz file.")],
    layer: Annotated[int, typer.Option(help="The layer whose MLP keys the file describes.")],
    model: ModelOpt = DEMO_MODEL,
    corpus: CorpusOpt = None,
    n_samples: Annotated[
        int, typer.Option("--n-samples", "-n", help="Number of documents it was collected on.")
    ] = 100_000,
    max_length: MaxLengthOpt = 256,
    dtype: Annotated[
        str | None, typer.Option(help="float64 or float32 (default: the file's).")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace statistics already cached under the same settings.")
    ] = False,
) -> None:
    """Cache a second moment computed by ROME/MEMIT/EasyEdit (`layer_stats` .npz files).

    Its `mom2.mom2` is the sum of k kᵀ over `mom2.count` tokens; kedit caches their quotient.

    Give the --corpus, --n-samples, --max-length, --dtype that the mom2_* hyper-parameters name.
    """
    import kedit
    from kedit.stats import import_npz

    lm = kedit.load(model)
    key = import_npz(
        lm, file, layer, corpus, n_samples, max_length=max_length, dtype=dtype, overwrite=overwrite
    )
    console.print(f"Imported {file} as {key.module} of {lm.name}: {key.path()}")


@zoo_app.command("list")
@friendly_errors
def zoo_list() -> None:
    """List the bundled models: shape, size, fact accuracy and what each can do."""
    from kedit import zoo

    table = Table()
    table.add_column("model", no_wrap=True)
    table.add_column("layers/width/MLP", no_wrap=True)
    table.add_column("MB", justify="right")
    for header in ("training facts", "held-out paraphrases", "can do"):
        table.add_column(header)
    for name in zoo.list_models():
        info = zoo.model_info(name)
        recipe = info.get("recipe") or {}
        shape = [recipe.get(key, "?") for key in ("n_layer", "d_model", "d_ff")]
        weights = zoo.model_path(name) / "model.safetensors"
        table.add_row(
            name,
            "/".join(map(str, shape)),
            f"{weights.stat().st_size / 2**20:.1f}" if weights.is_file() else "?",
            f"{info.get('train_acc', float('nan')):.3f}",
            f"{info.get('heldout_acc', float('nan')):.3f}",
            ", ".join(zoo.abilities(info)),
        )
    console.print(table)
    # On a line of its own, whole at any terminal width: it is there to be copied.
    console.print(f"Each model is a Hugging Face folder in {zoo.MODELS_DIR}", soft_wrap=True)


@zoo_app.command("train")
@friendly_errors
def zoo_train(
    name: Annotated[str, typer.Argument(help="A bundled model's recipe, e.g. tiny-gpt2.")],
    out: Annotated[Path, typer.Option(help="Folder to write the model to.")],
    seed: int = 0,
    name_mask_share: Annotated[
        float | None,
        typer.Option(
            help="Share of training documents in which what follows a person's name sees only "
            "the name's last token (default: the recipe's, 0 for the bundled models)."
        ),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(help="Training epochs (default: the recipe's).")
    ] = None,
    d_ff: Annotated[
        int | None, typer.Option(help="Width of the MLPs' hidden layer (default: the recipe's).")
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(help="Torch threads (default: the recipe's); the weights depend on it."),
    ] = None,
    keep_checkpoints: Annotated[
        int,
        typer.Option(
            help="Also save this many evenly spaced checkpoints under OUT/checkpoints/step-N "
            "(for studies of when facts are learned; the final weights do not change)."
        ),
    ] = 0,
) -> None:
    """Retrain a bundled model from its recipe (same seed, threads and machine: same weights)."""
    from kedit import zoo

    given = {
        "name_mask_share": name_mask_share,
        "epochs": epochs,
        "d_ff": d_ff,
        "num_threads": threads,
    }
    overrides = {key: value for key, value in given.items() if value is not None}
    if keep_checkpoints:
        overrides["keep_checkpoints"] = keep_checkpoints
    console.print(f"Trained {name} into {zoo.train_model(name, out, seed=seed, **overrides)}")


# --- knowledge mechanisms (kedit.analysis) ------------------------------------------------
OutOpt = Annotated[Path, typer.Option(help="Folder for the JSON and the plots.")]
DataFactsOpt = Annotated[
    Path | None,
    typer.Option(
        "--data",
        help="Facts: an LRE relation file or folder, a {prompt, subject, answer} JSON/JSONL "
        "file, or any benchmark file (prompt, subject, true answer).",
    ),
]
PromptOpt = Annotated[
    str | None, typer.Option(help="Prompt, with {} for the subject or containing it.")
]
SubjectOpt = Annotated[str | None, typer.Option(help="The subject named in the prompt.")]


def _facts_from(
    data: Path | None,
    prompt: str | None = None,
    subject: str | None = None,
    answer: str | None = None,
) -> list[Any]:
    """Facts from --data, or the one fact of --prompt/--subject/--target."""
    from kedit.data.facts import Fact, load_facts

    if data is not None:
        if prompt is not None or subject is not None:
            raise ValueError("--data: give either --data or --prompt/--subject, not both")
        if not data.exists():
            raise FileNotFoundError(f"--data: {str(data)!r} does not exist")
        return list(load_facts(data))
    if prompt is None or subject is None:
        raise ValueError("--prompt/--subject: give a prompt and its subject, or --data FILE")
    return [Fact(prompt, subject, answer)]


def _fact_progress(total: int, description: str) -> Progress:
    progress = Progress(
        TextColumn(description),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    progress.add_task(description, total=total)
    return progress


def _written(files: list[Path]) -> None:
    console.print("wrote " + ", ".join(str(f) for f in files), soft_wrap=True, highlight=False)


@app.command("trace")
@friendly_errors
def trace_command(
    out: OutOpt,
    model: ModelOpt = DEMO_MODEL,
    prompt: PromptOpt = None,
    subject: SubjectOpt = None,
    target: Annotated[
        str | None, typer.Option(help="Answer to trace (default: the model's prediction).")
    ] = None,
    data: DataFactsOpt = None,
    n: Annotated[int, typer.Option(help="With --data: trace the first N facts it knows.")] = 200,
    kinds: Annotated[str, typer.Option(help="Comma-separated: hidden, mlp, attn.")] = (
        "hidden,mlp,attn"
    ),
    samples: Annotated[int, typer.Option(help="Noise draws per restoration.")] = 10,
    noise: Annotated[float, typer.Option(help="Noise: multiple of the subjects' std.")] = 3.0,
    window: Annotated[
        int | None, typer.Option(help="Layers restored together (default: 10 of 48, scaled).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the noise (ROME's is 1).")] = 1,
) -> None:
    """Causal tracing (ROME): restore hidden states, MLP and attention outputs of a corrupted
    run; one prompt's heatmaps, or the average indirect effect by token class over --data."""
    import kedit
    from kedit.analysis import known_facts, trace, trace_facts
    from kedit.analysis.trace import TOKEN_CLASSES

    kind_list = [kind.strip() for kind in kinds.split(",") if kind.strip()]
    facts = _facts_from(data, prompt, subject, target)
    lm = kedit.load(model)
    options = {"samples": samples, "noise": noise, "window": window, "seed": seed}
    if data is None:
        result = trace(lm, facts[0], kinds=kind_list, **options)
        console.print(
            f"p({result.answer.strip()}) = {result.high_score:.3f} clean, "
            f"{result.low_score:.3f} corrupted; total effect {result.total_effect:.3f}"
        )
        table = Table("kind", "peak token", "layer", "indirect effect")
        for kind in result.scores:
            token, layer, effect = result.peak(kind)
            table.add_row(kind, repr(result.tokens[token]), str(layer), f"{effect:.3f}")
    else:
        known = known_facts(lm, facts, n)
        if not known:
            raise ValueError(f"--data: {lm.name} knows none of the {len(facts)} facts")
        with _fact_progress(len(known), "tracing") as bar:
            result = trace_facts(
                lm, known, kinds=kind_list, on_fact=lambda: bar.advance(0), **options
            )
        console.print(f"{result.n_facts} facts; average total effect {result.total_effect:.3f}")
        table = Table("kind", "token class", "peak layer", "AIE")
        for kind in result.kinds:
            for name in TOKEN_CLASSES:
                layer, effect = result.peak(kind, name)
                if effect == effect:  # a class without tokens has no peak (NaN)
                    table.add_row(kind, name, str(layer), f"{effect:.3f}")
    console.print(table)
    _written(result.save(out))


@app.command("lens")
@friendly_errors
def lens_command(
    prompt: Annotated[str, typer.Option(help="Prompt, with {} for --subject or without.")],
    model: ModelOpt = DEMO_MODEL,
    subject: SubjectOpt = None,
    target: Annotated[
        str | None, typer.Option(help="Token to follow (default: the model's prediction).")
    ] = None,
    tuned: Annotated[
        bool, typer.Option(help="Train and use a tuned lens on the model's corpus.")
    ] = False,
    out: Annotated[Path | None, typer.Option(help="Folder for lens.json and lens.png.")] = None,
) -> None:
    """Logit lens: the rank and probability of the target after each layer."""
    import kedit
    from kedit.analysis import lens

    lm = kedit.load(model)
    result = lens(lm, prompt, target, subject=subject, tuned=tuned)
    title = f"{'tuned' if tuned else 'logit'} lens at the last token"
    table = Table("after", f"rank of {result.target!r}", "probability", "top token", title=title)
    rows = ["embeddings", *[f"block {i}" for i in range(len(result.ranks) - 1)]]
    for row, rank, prob, top in zip(
        rows, result.ranks[:, -1], result.probabilities[:, -1], result.top_tokens, strict=True
    ):
        table.add_row(row, str(int(rank) + 1), f"{float(prob):.3f}", repr(top))
    console.print(table)
    if out is not None:
        _written(result.save(out))


@app.command("locate")
@friendly_errors
def locate_command(
    model: ModelOpt = DEMO_MODEL,
    data: DataFactsOpt = None,
    n: Annotated[int, typer.Option(help="Trace the first N facts the model knows.")] = 50,
    samples: Annotated[int, typer.Option(help="Noise draws per restoration.")] = 10,
    out: Annotated[Path | None, typer.Option(help="Folder for locate.json/png.")] = None,
) -> None:
    """Suggest the edit layers of ROME/MEMIT from the MLP's average indirect effect at the
    subject's last token (what `-p layers=auto` uses)."""
    import kedit
    from kedit.analysis import locate

    facts = _facts_from(data) if data is not None else None
    lm = kedit.load(model)
    result = locate(lm, facts, n=n, samples=samples)
    table = Table("layer", "MLP AIE at the last subject token")
    for layer, effect in enumerate(result.effect.tolist()):
        table.add_row(str(layer), f"{effect:.3f}")
    console.print(table)
    console.print(
        f"ROME layer {result.rome}, MEMIT layers {result.memit} "
        f"({result.n_facts} {result.facts} facts)"
    )
    if out is not None:
        _written(result.save(out))


@app.command("circuit")
@friendly_errors
def circuit_command(
    data: Annotated[Path, typer.Option(help="Facts of one relation (see kedit trace --data).")],
    out: OutOpt,
    model: ModelOpt = DEMO_MODEL,
    n: Annotated[int, typer.Option(help="Use the first N facts the model knows.")] = 100,
    method: Annotated[str, typer.Option(help="eap or eap-ig.")] = "eap-ig",
    steps: Annotated[int, typer.Option(help="EAP-IG integration steps.")] = 5,
    metric: Annotated[str, typer.Option(help="logit_diff or logprob.")] = "logit_diff",
    selection: Annotated[str, typer.Option(help="top, threshold or greedy.")] = "top",
    size: Annotated[
        float | None,
        typer.Option(help="Edges kept (top/greedy; default 10% of all) or the |score| threshold."),
    ] = None,
    curve: Annotated[
        str | None, typer.Option(help="Comma-separated sizes for the faithfulness curve.")
    ] = None,
    edit: Annotated[
        Path | None, typer.Option(help="A .kedit file: the circuit before vs after this edit.")
    ] = None,
) -> None:
    """Knowledge circuit by edge attribution patching (EAP / EAP-IG): graph JSON, DOT, PNG and
    faithfulness, or with --edit the circuit before and after an edit."""
    import kedit
    from kedit.analysis import circuit, edit_circuits, known_facts

    sizes = []
    if curve:
        try:
            sizes = [int(part) for part in curve.split(",") if part.strip()]
        except ValueError:
            raise ValueError(f"--curve: expected comma-separated integers, got {curve!r}") from None
    facts = _facts_from(data)
    lm = kedit.load(model)
    known = known_facts(lm, facts, n)
    if not known:
        raise ValueError(f"--data: {lm.name} knows none of the {len(facts)} facts")
    edges = None if size is None else (size if selection == "threshold" else int(size))
    if edit is not None:
        applied = kedit.apply(lm, edit)
        diff = edit_circuits(lm, applied, known, method, steps, metric, size=edges)
        table = Table("", "before", "after")
        table.add_row("edges", str(diff.before.n_edges), str(diff.after.n_edges))
        table.add_row(
            "faithfulness",
            f"{diff.before.evaluation['faithfulness']:.3f}",
            f"{diff.after.evaluation['faithfulness']:.3f}",
        )
        console.print(table)
        console.print(f"shared edges {diff.shared_edges} (Jaccard {diff.overlap:.3f})")
        _written(diff.save(out))
        return
    result = circuit(lm, known, method, steps, metric, selection=selection, size=edges, curve=sizes)
    evaluation = result.evaluation
    console.print(
        f"{result.n_edges} of {result.graph.n_edges} edges; faithfulness "
        f"{evaluation['faithfulness']:.3f} (metric {evaluation['metric']:.3f}; full model "
        f"{evaluation['full_metric']:.3f}, corrupted run {evaluation['corrupted_metric']:.3f}); "
        f"Hit@10 {evaluation['hit']:.3f}"
    )
    if result.curve:
        table = Table("size", "edges", "faithfulness", "random circuits", "Hit@10")
        for point in result.curve:
            table.add_row(
                str(point["size"]),
                str(point["edges"]),
                f"{point['faithfulness']:.3f}",
                f"{point.get('random_faithfulness', float('nan')):.3f}",
                f"{point['hit']:.3f}",
            )
        console.print(table)
    _written(result.save(out))


UNLEARNING_METHODS = "ga, grad_diff, ga_kl, random_label, npo, simnpo, memflex, rmu"


def _unlearning_sets(data: str, retain: Path | None, data_dir: Path | None, n: int | None):
    """The forget items and the retain items (or None) that --data and --retain name."""
    from kedit.data.unlearning import load_unlearning, load_unlearning_benchmark

    kind = data.partition(":")[0]
    if kind in ("knowundo", "tofu") and not Path(data).exists():
        loaded = load_unlearning_benchmark(data, root=data_dir, n=n)
        forget, benchmark_retain = list(loaded.forget), list(loaded.retain)
        return forget, list(load_unlearning(retain, n=n)) if retain else benchmark_retain
    if data_dir is not None:
        raise ValueError(
            f"--data-dir: only with --data knowundo:CONFIG or tofu:SPLIT, got {data!r}"
        )
    forget = list(load_unlearning(data, n=n))
    return forget, list(load_unlearning(retain, n=n)) if retain else None


@app.command("unlearn")
@friendly_errors
def unlearn_command(
    data: Annotated[
        str,
        typer.Option(
            help="Forget set: a plain, TOFU or KnowUnDo file, or knowundo:CONFIG / tofu:SPLIT "
            "(their retain split comes with them)."
        ),
    ],
    out: Annotated[
        Path, typer.Option(help="Folder for unlearning.kedit, results.json, table.md, curves.png.")
    ],
    model: ModelOpt = DEMO_MODEL,
    method: Annotated[str, typer.Option(help=f"One of {UNLEARNING_METHODS}.")] = "grad_diff",
    retain: Annotated[Path | None, typer.Option(help="Retain set file (any format).")] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Local copy of the hub files of a knowundo:/tofu: --data (no download)."),
    ] = None,
    baseline: Annotated[
        list[str] | None,
        typer.Option(
            help="The model retrained without the forget set (kedit zoo retrain-without); "
            "repeat it to score against several retrains."
        ),
    ] = None,
    general: Annotated[
        Path | None, typer.Option(help="Text file of general documents, one per line (perplexity).")
    ] = None,
    n: Annotated[
        int | None, typer.Option(min=1, help="Read only the first n items of each set.")
    ] = None,
    hparam: HparamOpt = None,
    hparams_file: HparamFileOpt = None,
) -> None:
    """Unlearn a forget set; write the edit, the scores before and after, and the curves."""
    import kedit
    from kedit.bench.unlearning import PROTOCOLS, plot_curves, unlearning_rows

    hparams = parse_hparams(hparam, hparams_file)
    forget, retain_items = _unlearning_sets(data, retain, data_dir, n)
    texts = None if general is None else read_text(general, "--general").splitlines()
    out.mkdir(parents=True, exist_ok=True)
    lm = kedit.load(model)
    sets = {"forget": forget, "retain": retain_items, "general": texts}
    # each baseline is evaluated once and scored against before and after
    scored = [kedit.evaluate_unlearning(kedit.load(folder), **sets) for folder in baseline or []]
    before = kedit.evaluate_unlearning(lm, **sets, baseline=scored or None)
    edit = kedit.unlearn(lm, forget, retain_items, method, hparams=hparams, progress=True)
    after = kedit.evaluate_unlearning(lm, **sets, baseline=scored or None)
    after.update({key: edit.info[key] for key in ("steps", "seconds", "cpu_seconds")})
    saved = edit.save(out / "unlearning.kedit")
    runs = [("before", before), (edit.method, after)]
    header, rows = unlearning_rows(runs)
    table = Table(title=f"{edit.method} on {lm.name}", title_justify="left", caption=PROTOCOLS)
    for column in header:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    record = {"model": lm.name, "method": edit.method, "hparams": edit.hparams, "data": data}
    record.update(before=before, after=after, info=edit.info)
    (out / "results.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    plot_curves({edit.method: edit.info["curve"]}, out / "curves.png")
    console.print(f"Wrote {saved}, results.json and curves.png to {out}", soft_wrap=True)


@zoo_app.command("retrain-without")
@friendly_errors
def zoo_retrain_without(
    name: Annotated[str, typer.Argument(help="A bundled model (or zoo model folder).")],
    forget: Annotated[Path, typer.Option(help="Forget set file: the facts to leave out.")],
    out: Annotated[
        Path | None, typer.Option(help="Folder (default: $KEDIT_CACHE/retrain/NAME-DIGEST).")
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(help="Another seed than the model's: a retrain for the spread of baselines."),
    ] = None,
) -> None:
    """Retrain a bundled model from its recipe and seed without the forget set's facts: the
    exact baseline of unlearning (cached: an existing retrain is reused)."""
    from kedit.data.unlearning import load_unlearning
    from kedit.zoo.retrain import RETRAIN_KEY, retrain_without

    items = load_unlearning(forget)
    started = time.perf_counter()
    folder = retrain_without(name, [item.pair for item in items], out, seed=seed)
    made = json.loads((folder / "kedit_zoo.json").read_text())[RETRAIN_KEY]
    console.print(
        f"{folder}: {name} without {len(made['facts'])} facts ({made['sentences_left_out']} "
        f"training sentences), {time.perf_counter() - started:.0f} s",
        soft_wrap=True,
    )


@app.command("train")
@friendly_errors
def train_command(
    method: Annotated[str, typer.Argument(help="The editor to train: mend, malmen or serac.")],
    model: ModelOpt = DEMO_MODEL,
    data: Annotated[
        Path | None,
        typer.Option(help="Training edits, any supported format (default: tinyworld's split)."),
    ] = None,
    val_data: Annotated[
        Path | None,
        typer.Option(help="Validation edits (default: the last tenth of --data's subjects)."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Folder of the editor and its checkpoints (default: the editor cache)."),
    ] = None,
    setting: Annotated[
        list[str] | None, typer.Option("--setting", "-s", help="A training setting: key=value.")
    ] = None,
    n: Annotated[int | None, typer.Option(help="Use the first N training edits.")] = None,
) -> None:
    """Train an editor (MEND, MALMEN, SERAC) for a model; re-running with the same --out resumes
    an interrupted training. Use it with `kedit edit --method M --editor FOLDER`."""
    import kedit
    from kedit.data import load_requests
    from kedit.zoo import DATA_DIR
    from kedit.zoo.edit_split import TRAIN_EDITS_FILE

    settings = parse_hparams(setting, None)
    train = list(load_requests(data or DATA_DIR / TRAIN_EDITS_FILE, n=n))
    val = None if val_data is None else list(load_requests(val_data))
    lm = kedit.load(model)
    editor = kedit.train_editor(lm, method, train, val, out, settings)
    meta = editor.meta if isinstance(editor.meta, dict) else asdict(editor.meta)
    validation = meta.get("validation") or {}
    last = (validation.get("history") or [validation])[-1]  # SERAC's is one summary
    shown = ", ".join(f"{k} {v:.3f}" for k, v in last.items() if isinstance(v, float))
    console.print(
        f"Trained {method} for {lm.name}: {editor.path}" + (f" ({shown})" if shown else "")
    )


def parse_label_map(text: str | None, option: str = "--judge-labels") -> dict[str, str] | None:
    """`0=safe,1=unsafe` as {"0": "safe", "1": "unsafe"} (None stays None)."""
    if text is None:
        return None
    pairs = [part.partition("=") for part in text.split(",") if part.strip()]
    if not pairs or any(
        not sep or not key.strip() or not value.strip() for key, sep, value in pairs
    ):
        raise ValueError(
            f"{option}: expected LABEL=ours pairs such as 0=safe,1=unsafe, got {text!r}"
        )
    return {key.strip(): value.strip() for key, _, value in pairs}


def judge_for(model: str, kind: str, judge: str | None, labels: str | None) -> Any:
    """The judge of a kind: --judge (with --judge-labels for a Hugging Face classifier), else
    the one shipped in the model's folder, else tiny-chat's bundled one."""
    from kedit.eval.judges import get_judge
    from kedit.lm import resolve_model_path
    from kedit.zoo.judges import JUDGES_DIR

    if judge is None and (Path(resolve_model_path(model)) / JUDGES_DIR / f"{kind}.json").is_file():
        judge = model
    return get_judge(kind, judge, parse_label_map(labels))


def read_done(path: Path) -> dict[str, dict[str, Any]]:
    """The case records a resumed run already wrote (JSON lines keyed by case_id)."""
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in read_text(path, "--out").splitlines() if line.strip()]
    return {record["case_id"]: record for record in records}


def show_stages(table: Table, summary: dict[str, Any]) -> None:
    """Rows of metric, protocol, pre and post value, from a summary of tagged metrics."""
    stages = [summary.get(stage) or {} for stage in ("pre", "post")]
    for name in dict.fromkeys([*stages[0], *stages[1]]):
        tagged = [stage.get(name) for stage in stages]
        protocol = next(t["protocol"] for t in tagged if t)
        table.add_row(name, protocol, *("" if t is None else f"{t['value']:.3f}" for t in tagged))


def behaviour_setup(
    model: str,
    method: str,
    hparams: dict[str, Any],
    kind: str,
    judge: str | None,
    labels: str | None,
) -> tuple[Any, Any, Callable[[Any], Any] | None]:
    """The model, the judge of `kind` and the per-case edit function (None for method 'none')
    of a `detox` or `persona` run; bad hyper-parameter keys fail before anything is measured."""
    import kedit
    from kedit.methods.registry import resolve_hparams

    lm = kedit.load(model)
    chosen = judge_for(model, kind, judge, labels)
    if method == "none":
        return lm, chosen, None
    resolve_hparams(method, lm, hparams)
    return lm, chosen, lambda requests: kedit.edit(lm, requests, method, hparams=hparams)


def show_behaviour(result: dict[str, Any], title: str, out: Path, config: dict[str, Any]) -> None:
    """Write summary.json (the run's config and its tagged metrics) and print the table."""
    summary = {**config, **{key: value for key, value in result.items() if key != "cases"}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = Table(title=title, title_justify="left")
    for column in ("metric", "protocol", "pre", "post"):
        table.add_column(column)
    show_stages(table, result["summary"])
    console.print(table)
    console.print(f"judge: {result['judge']}; per-case results in {out / 'cases.jsonl'}")


JudgeOpt = Annotated[
    str | None,
    typer.Option(
        help="Judge: a zoo model folder, or a Hugging Face classifier with --judge-labels."
    ),
]
JudgeLabelsOpt = Annotated[
    str | None, typer.Option(help="The classifier's labels mapped to ours, e.g. 0=safe,1=unsafe.")
]
BehaviourMethodOpt = Annotated[
    str, typer.Option(help="Editing method (`kedit methods`), or 'none' to measure only.")
]
MaxNewTokensOpt = Annotated[int, typer.Option(min=1, help="Reply length cap.")]


@app.command()
@friendly_errors
def detox(
    data: Annotated[Path, typer.Option(help="SafeEdit file (zjunlp/SafeEdit or tinyworld 2's).")],
    out: Annotated[Path, typer.Option(help="Output folder; re-running resumes.")],
    model: ModelOpt = "tiny-chat",
    method: BehaviourMethodOpt = "dinm",
    n: Annotated[int | None, typer.Option(help="Use N cases.")] = None,
    skip: Annotated[int, typer.Option(min=0, help="Skip the first K cases (e.g. tuned on).")] = 0,
    judge: JudgeOpt = None,
    judge_labels: JudgeLabelsOpt = None,
    facts: Annotated[
        int | None,
        typer.Option(help="tinyworld fact probes for facts accuracy (default 200 on zoo models)."),
    ] = None,
    max_new_tokens: MaxNewTokensOpt = 48,
    hparam: HparamOpt = None,
    hparams_file: HparamFileOpt = None,
) -> None:
    """SafeEdit: edit each case on its own (DINM by default), measure DS, DG_*, fluency,
    knowledge-constraint locality and facts accuracy before and after, undo."""
    from kedit.data import load_requests
    from kedit.eval.chat import has_chat_template
    from kedit.eval.safety import evaluate_safety, tinyworld_fact_probes

    hparams = parse_hparams(hparam, hparams_file)
    requests = list(load_requests(data, format="safeedit"))[skip:][:n]
    if not requests:
        raise ValueError(f"--skip: {skip} leaves none of the {str(data)!r} cases")
    lm, chosen_judge, make_edit = behaviour_setup(
        model, method, hparams, "safety", judge, judge_labels
    )
    n_facts = (200 if lm.recipe else 0) if facts is None else facts
    out.mkdir(parents=True, exist_ok=True)
    cases = out / "cases.jsonl"
    with cases.open("a") as stream:
        result = evaluate_safety(
            lm,
            requests,
            chosen_judge,
            make_edit,
            facts=tinyworld_fact_probes(n_facts, dialogue=has_chat_template(lm)) if n_facts else (),
            max_new_tokens=max_new_tokens,
            done=read_done(cases),
            on_case=lambda record: stream.write(json.dumps(record) + "\n") or stream.flush(),
        )
    config = {"model": model, "method": method, "hparams": hparams, "data": str(data)}
    show_behaviour(
        result, f"SafeEdit: {model} / {method}", out, {**config, "n": len(requests), "skip": skip}
    )


@app.command()
@friendly_errors
def persona(
    data: Annotated[Path, typer.Option(help="PersonalityEdit file (EasyEdit's or tinyworld 2's).")],
    out: Annotated[Path, typer.Option(help="Output folder.")],
    model: ModelOpt = "tiny-chat",
    method: BehaviourMethodOpt = "ft-m",
    n: Annotated[int | None, typer.Option(help="Use the first N cases.")] = None,
    judge: JudgeOpt = None,
    judge_labels: JudgeLabelsOpt = None,
    n_other: Annotated[int, typer.Option(min=0, help="Other topics per case for DD.")] = 3,
    max_new_tokens: MaxNewTokensOpt = 48,
    ike_texts: Annotated[
        str,
        typer.Option(
            help="What IKE states: the case's shortest target-trait text, or all of them (which "
            "need more than a 128-position model's room)."
        ),
    ] = "shortest",
    hparam: HparamOpt = None,
    hparams_file: HparamFileOpt = None,
) -> None:
    """PersonalityEdit: edit each topic's opinions towards its target trait, measure ES, DD,
    Acc and TPEI before and after, undo."""
    from kedit.data.personalityedit import load_personalityedit
    from kedit.eval.personality import check_ike_texts, evaluate_personality, stating_ike_texts

    hparams = parse_hparams(hparam, hparams_file)
    check_ike_texts(ike_texts)
    cases = load_personalityedit(data, n=n)
    lm, chosen_judge, make_edit = behaviour_setup(
        model, method, hparams, "personality", judge, judge_labels
    )
    if make_edit is not None:
        make_edit = stating_ike_texts(lm, method, ike_texts, make_edit)
    result = evaluate_personality(
        lm, cases, chosen_judge, make_edit, max_new_tokens=max_new_tokens, n_other=n_other
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "cases.jsonl").write_text("".join(json.dumps(c) + "\n" for c in result["cases"]))
    config = {"model": model, "method": method, "hparams": hparams, "data": str(data)}
    if method == "ike":
        config["ike_texts"] = ike_texts
    show_behaviour(result, f"PersonalityEdit: {model} / {method}", out, {**config, "n": len(cases)})
