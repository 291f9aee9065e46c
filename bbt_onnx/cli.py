"""`bbt-onnx`: thin click commands over the library. Progress and logs go to stderr, results to stdout.

Each option is generated from the config dataclass that owns it (`options.click_options`); rules between flags are
declared with the command (`Rule`); the work is a library function.
"""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import click

from . import __version__
from .bench import BenchOptions
from .check import Tolerances
from .data import DataSpec
from .deploy import DeployOptions
from .engines import EngineOptions
from .errors import BBTError
from .exporting import ExportOptions
from .fileio import dumps, storage_error
from .options import Command, Rule, click_options, from_params
from .progress import Progress, row_progress
from .serving.repository import RepoOptions
from .serving.server import ServeOptions
from .tasks import TaskSpec
from .tuner import TuneConfig


class Group(click.Group):
    """User mistakes, ours (BBTError) and click's (usage errors), end as one `error:` line on stderr and exit
    code 2; a refused read or write too. Any other exception is a bug and keeps its traceback."""

    command_class = Command

    def parse_args(self, ctx, args):
        with one_line_errors(ctx):
            return super().parse_args(ctx, args)

    def invoke(self, ctx):
        with one_line_errors(ctx):
            return super().invoke(ctx)


@contextmanager
def one_line_errors(ctx):
    try:
        yield
    except click.exceptions.NoArgsIsHelpError:
        raise  # bare `bbt-onnx`: click prints the help
    except click.ClickException as exc:
        fail(ctx, exc.format_message())
    except BBTError as exc:
        fail(ctx, exc.render(flags_of(ctx)))
    except OSError as exc:
        if exc.errno == errno.EPIPE:
            raise  # a closed pipe downstream (`| head`): click handles it quietly
        fail(ctx, str(storage_error(exc.filename, exc, "use") if exc.filename else exc))


def flags_of(ctx) -> dict[str, str]:
    """The running command's options by their parameter names: what an error's arguments are called here."""
    command = ctx.command
    if isinstance(command, click.Group) and ctx.invoked_subcommand:
        command = command.get_command(ctx, ctx.invoked_subcommand) or command
    return {p.name: p.opts[0] for p in command.params if isinstance(p, click.Option) and p.opts}


def fail(ctx, message: str) -> None:
    click.echo("error: " + " ".join(message.split()), err=True)
    ctx.exit(2)


def err(msg: str) -> None:
    click.echo(msg, err=True)


def emit_json(obj) -> None:
    click.echo(dumps(obj, indent=2))


def model_option(help="Model directory from `bbt-onnx export`.", required=True):
    return click.option("--model", "model_dir", required=required, type=click.Path(file_okay=False), help=help)


quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress or notes on stderr.")
ENGINE_RULES = (
    Rule("--server-timeout goes with --server", given=("server_timeout",), absent=("server",)),
    Rule("--token-file goes with --server", given=("token_file",), absent=("server",)),
    Rule("{flags} choose the in-process engine; with --server the server's graph and device are used, so drop them",
         given=("server",), any_of=("device", "precision", "threads")),
)
LOCAL_ENGINE = ("device", "precision", "threads")


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="bbt-onnx")
def cli():
    """Black-Box Tuning of language models served as forward-only ONNX Runtime engines.

    export turns a Hugging Face model into a prompt graph; tune learns a continuous prompt
    with CMA-ES from a few labelled examples (BBT, or BBTv2 with --method bbtv2); evaluate and
    predict use it; check compares engines on the same prompts; bench times the engine against
    PyTorch. serve puts the graph on a Triton server, and --server URL tunes and scores through
    its API from a client-dir; triton-repo writes the production repository. Every mistake a
    user can make ends in one `error:` line, exit 2. deploy ships a tuned prompt as one ONNX
    graph from text to label, which onnxruntime runs without bbt-onnx.
    """


# --------------------------------------------------------------------------- export
@cli.command()
@click_options(ExportOptions)
@quiet_option
def export(quiet, **params):
    """Export a masked or causal LM to an ONNX prompt graph, check it against PyTorch, write its manifest."""
    options = from_params(ExportOptions, params)
    if quiet:  # transformers' and the hub's notes and progress bars too
        os.environ.update(TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1", TQDM_DISABLE="1")
    try:
        from bbt_onnx_export.pipeline import export_model
    except ImportError as exc:
        if (exc.name or "").startswith("onnxruntime"):
            raise BBTError("export runs onnxruntime: pip install 'bbt-onnx[cpu]' (or [gpu])") from None
        raise BBTError(f"export needs the `export` extra (torch, transformers, onnx): pip install 'bbt-onnx[export]' "
                       f"after pip install torch==2.13.0 ({exc})") from None
    manifest = export_model(options, log=(lambda _m: None) if quiet else err)
    summary = {name: {"file": g.file, **g.parity, **({"fused_ops": g.fused_ops} if g.fused_ops else {})}
               for name, g in manifest.graphs.items()}
    emit_json({"out": str(options.out), "kind": manifest.kind, "architecture": manifest.architecture,
               "prompt_tokens": manifest.prompt_tokens, "embedding_std": manifest.embedding_std, "graphs": summary})


# --------------------------------------------------------------------------- tune
TUNE_FLAGS = ("model_dir", "out", "force", "force_any", "precision", "seeds", "data_seed", *TaskSpec.__dataclass_fields__,
              *(f for f in DataSpec.__dataclass_fields__ if f != "seed"), *TuneConfig.__dataclass_fields__)


def parse_seeds(ctx, param, value):
    if value is None:
        return None
    try:
        seeds = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of whole numbers, e.g. 0,1,2") from None
    return seeds


@cli.command(rules=(
    Rule("--resume takes the run's own settings; drop {flags}", given=("resume",), any_of=TUNE_FLAGS),
    Rule("--trust-checkpoint lets --resume read an old checkpoint.pkl; it goes with --resume",
         given=("trust_checkpoint",), absent=("resume",)),
    Rule("--model is required", absent=("resume", "model_dir")),
    Rule("--out is required (the run directory)", absent=("resume", "out")),
    Rule("--k-shot samples --data; a --train file is used whole, so drop one of them", given=("train", "k_shot")),
    Rule("--eval-every scores a dev set, and --train without --dev has none; add --dev or drop --eval-every",
         given=("train", "eval_every"), absent=("dev",)),
    Rule("--seeds names every seed of the run; drop --seed", given=("seeds", "seed")),
    Rule("--data-seed draws the k-shot split of --data; a --train file is used whole, so drop it",
         given=("train", "data_seed")),
    Rule("--track-uri goes with --track", given=("track_uri",), absent=("track",)),
    *ENGINE_RULES))
@model_option(required=False)
@click_options(TaskSpec)
@click_options(DataSpec)
@click.option("--out", type=click.Path(file_okay=False), help="Run directory to write.")
@click_options(TuneConfig)
@click.option("--seeds", callback=parse_seeds, help="Several seeds, e.g. 0,1,2, run in lock-step on the same rows "
              "(every seed's candidates in one engine call per generation); the run keeps their ensemble.")
@click.option("--data-seed", type=click.IntRange(0, 2**32 - 1), help="Seed of the k-shot draw from --data "
              "[default: --seed, or the first of --seeds].")
@click_options(EngineOptions)
@click.option("--track", type=click.Choice(["mlflow"]), help="Log the run to an experiment tracker: parameters, "
              "train loss and dev metric per generation, the baselines, the prompt and loss.png (the `track` extra).")
@click.option("--track-uri", help="The tracker's store, e.g. sqlite:///mlflow.db or file:./mlruns [default: "
              "MLFLOW_TRACKING_URI, else MLflow's own].")
@click.option("--resume", type=click.Path(path_type=Path, file_okay=False), help="Continue an interrupted run.")
@click.option("--trust-checkpoint", is_flag=True, help="With --resume: read an old pickle checkpoint.pkl (from "
              "bbt-onnx before checkpoint.npz). Unpickling runs any code the file holds: only for a run you wrote.")
@click.option("--force", is_flag=True, help="Replace an earlier run in --out (kept until the new run's first "
              "checkpoint).")
@click.option("--force-any", is_flag=True, help="Write the run into --out even when it holds files but no run (they "
              "are kept; only the run's own files are written).")
@quiet_option
@click.pass_context
def tune(ctx, model_dir, out, resume, force, force_any, trust_checkpoint, quiet, seeds, data_seed, track, track_uri,
         **params):
    """Learn a continuous prompt with CMA-ES, using only forward calls of the exported graph.

    Before tuning, the plain template is scored on dev in every framing the model allows; after it, the tuned prompt
    (or the seeds' ensemble) is kept only when it beats the best of them on dev (--choose, --no-fallback). Writes
    prompt.npz (what was kept), run.json, log.jsonl, loss.png and checkpoint.npz into --out, prints the metrics JSON.
    """
    from .runs import RunDir
    from .workflow import Hooks, TuneRequest, tune as run_tune

    task, engine = from_params(TaskSpec, params), from_params(EngineOptions, params).spec()
    config = from_params(TuneConfig, params)
    if resume:
        settings = RunDir.open_existing(resume).read_json()["settings"]
        request = TuneRequest.from_settings(settings, str(resume), engine)
    else:
        if seeds:
            config = replace(config, seed=seeds[0])
        data = from_params(DataSpec, params, seed=config.seed if data_seed is None else data_seed)
        request = TuneRequest(model_dir, task.resolve(), data, config, str(out), engine, seeds or ())

    progress = Progress(quiet)
    hooks = Hooks(log=(lambda m: None) if quiet else err, start=progress.start, event=progress.update,
                  tuned=progress.close)
    if track:
        from .tracking import open_tracker

        tracker = open_tracker(track, track_uri)

        def on_event(event):
            progress.update(event)
            tracker.generation(event)

        hooks.event, hooks.begin, hooks.end = on_event, tracker.start, tracker.finish
    try:
        outcome = run_tune(request, hooks, resume=bool(resume), force=force, force_any=force_any,
                           trust_checkpoint=trust_checkpoint)
    except KeyboardInterrupt:
        progress.close()
        from .runs import CHECKPOINTS

        if any((Path(request.out) / name).is_file() for name in CHECKPOINTS):
            err(f"interrupted; continue with: bbt-onnx tune --resume {request.out}")
        else:
            err("interrupted before the first checkpoint, so there is nothing to resume; run the same command "
                "again to start over")
        ctx.exit(130)
    finally:
        progress.close()
    m = outcome.metrics
    dev = "n/a" if m["dev_metric"] is None else f"{m['dev_metric']:.4f}"
    test = "n/a" if m["test_metric"] is None else f"{m['test_metric']:.4f}"
    tuned = "" if m["kept"] != outcome.record["choice"].get("kept") or outcome.record["choice"].get("tuned", True) \
        else f" (the tuned prompt: test {m['tuned_test_metric']:.4f})" if m["tuned_test_metric"] is not None else ""
    err(f"done: {m['api_calls']} calls in {m['wall_seconds']:.1f}s ({m['calls_per_second']:.1f}/s), train loss "
        f"{m['train_loss_initial']:.4f} -> {m['train_loss_final']:.4f}; kept {m['kept']}: dev {m['metric_name']} "
        f"{dev}, test {test}{tuned}; wrote {outcome.run_dir}")
    emit_json(m)


# --------------------------------------------------------------------------- evaluate / predict
@cli.command(rules=ENGINE_RULES)
@model_option()
@click.option("--prompt", "prompt_dir", type=click.Path(path_type=Path), help="Run directory (or prompt.npz).")
@click.option("--data", required=True, help="Labelled CSV/TSV/JSONL file to score.")
@click.option("--no-prompt", is_flag=True, help="Score z = 0: the manual template, the untuned baseline.")
@click.option("--prompt-tokens", type=click.IntRange(0),
              help="Prompt slots for --no-prompt without a run [default: model's P].")
@click_options(TaskSpec)
@click_options(EngineOptions)
@quiet_option
def evaluate(model_dir, prompt_dir, data, no_prompt, prompt_tokens, quiet, **params):
    """Score a tuned prompt (or the bare template) on a labelled file; prints a metrics JSON."""
    from .data import check_labels, read_examples
    from .model import Model
    from .prompt import load_run_prompt, template_prompt

    task = from_params(TaskSpec, params)
    prompt = load_run_prompt(prompt_dir, no_prompt, task.given, prompt_tokens)
    model = Model.load(model_dir, from_params(EngineOptions, params).spec(), deep=prompt is not None and prompt.deep)
    prompt = prompt or template_prompt(model.manifest, task.resolve(), prompt_tokens)
    rows = read_examples(data)
    check_labels(rows, prompt.task.label_keys, data)
    prompt.check_model(model)
    enc = prompt.encoder(model).encode(rows)  # every row checked before the progress bar starts
    with row_progress(len(rows), "scoring", quiet) as advance:
        result = prompt.evaluate(model, enc, on_batch=advance).to_json()
    result.update(task=prompt.task.name, prompt="none (z = 0)" if no_prompt else str(prompt_dir),
                  provider=model.engine.provider)
    emit_json(result)


@cli.command(rules=ENGINE_RULES)
@model_option()
@click.option("--prompt", "prompt_dir", required=True, type=click.Path(path_type=Path), help="Run directory.")
@click.option("--input", "input_path", required=True,
              help="CSV/TSV/JSONL with a text column, a .txt with one text per line, or - for stdin.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), help="Write JSONL here [default: stdout].")
@click_options(EngineOptions)
@quiet_option
def predict(model_dir, prompt_dir, input_path, output, quiet, **params):
    """Label texts with a run's result (its tuned prompt, ensemble or kept template); writes JSONL: text, label and
    per-label probabilities."""
    from .data import read_input
    from .fileio import check_output_file, check_writable, write_text_atomic
    from .model import Model
    from .engines.triton import served_classifier
    from .prompt import load_prompt, predictions, result_file

    if output:
        check_writable(output)
        check_output_file(output, [("input", input_path), ("model directory", model_dir), ("run", prompt_dir)])
    prompt = load_prompt(prompt_dir)
    model = Model.load(model_dir, from_params(EngineOptions, params).spec(), deep=prompt.deep)
    prompt.check_model(model)
    rows = read_input(input_path, click.get_binary_stream("stdin"))
    enc = prompt.encoder(model).encode(rows)  # every row checked before the progress bar starts
    classifier = served_classifier(model.engine, prompt, result_file(prompt_dir), log=err)
    if classifier is not None:
        err(f"labelling through the server's classifier {classifier.model!r}")
        probs = classifier.probabilities([r.text for r in rows], [r.text_b or "" for r in rows])
        preds = predictions(probs, prompt.task.label_keys)
    else:
        with row_progress(len(rows), "predicting", quiet) as advance:
            preds = prompt.predict(model, enc, on_batch=advance)
    lines = "".join(dumps({"text": r.text, **({"text_b": r.text_b} if r.text_b else {}), "label": p.label,
                           "probabilities": p.probabilities}) + "\n" for r, p in zip(rows, preds))
    if output:
        write_text_atomic(output, lines)
        err(f"wrote {len(preds)} predictions to {output}")
    else:
        click.echo(lines, nl=False)


# --------------------------------------------------------------------------- deploy
@cli.command()
@model_option()
@click.option("--prompt", "prompt_dir", required=True, type=click.Path(path_type=Path),
              help="Run directory of a finished tune (or its prompt.npz).")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Folder to write: classifier.onnx (with --input ids also encode.py, recipe.json, tokenizer.json).")
@click_options(DeployOptions)
@quiet_option
def deploy(model_dir, prompt_dir, out, quiet, **params):
    """Ship a tuned prompt: OUT/classifier.onnx, one graph from text to label.

    Inputs `text` [N] (and `text_b` for a pair task), outputs `probabilities` [N, K] and `label` [N]; the
    tokenizer, the template and the prompt are inside, so onnxruntime with onnxruntime-extensions runs it without
    bbt-onnx. Checked against predict on probe rows before OUT is written; prints a summary JSON.
    """
    from .deploy import deploy as run_deploy

    opts = from_params(DeployOptions, params, model_dir=model_dir, prompt=str(prompt_dir), out=out)
    summary = run_deploy(opts, log=(lambda m: None) if quiet else err)
    err(f"wrote {summary['classifier']}: {', '.join(summary['inputs'])} -> probabilities, label")
    emit_json(summary)


# --------------------------------------------------------------------------- report
@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["markdown", "json"]), default="markdown", show_default=True,
              help="A markdown table, or the same rows as JSON.")
def report(runs, fmt):
    """Tabulate finished runs from their run.json files: per task and setting, each baseline, each seed, the mean
    ± std over seeds, the ensemble and the result each run kept (dev and test)."""
    from .report import format_markdown, summarise

    summary = summarise(list(runs))
    emit_json(summary.to_json()) if fmt == "json" else click.echo(format_markdown(summary))


# --------------------------------------------------------------------------- check
@cli.command(rules=(Rule("--token-file goes with a server URL in --engines", given=("token_file",),
                         absent=("engines",)),))
@model_option()
@click.option("--prompt", "prompt_dir", type=click.Path(path_type=Path),
              help="Run directory: its tuned prompt and z = 0 [default: z = 0 and three random prompts].")
@click.option("--data", help="Rows to score (labelled for a metric) [default: built-in sample rows].")
@click.option("--engines", help="Comma-separated DEVICE:PRECISION or server URL, e.g. cpu:fp32,cpu:int8,cuda:fp16,"
              "http://127.0.0.1:8000 [default: every graph of the model on every provider installed; those that "
              "cannot run are skipped].")
@click.option("--token-file", type=click.Path(dir_okay=False), help="Access token for the servers in --engines.")
@click_options(TaskSpec)
@click_options(Tolerances)
@click_options(EngineOptions, only=("threads",))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.pass_context
def check(ctx, model_dir, prompt_dir, data, engines, token_file, threads, as_json, **params):
    """Score the same rows and prompts on several engines and compare each with CPU fp32.

    Exit code 0 when every engine is within tolerance (and every graph matches its sha256), 1 when one is
    not, 2 for a mistake. The table goes to stderr; --json prints the report on stdout.
    """
    from .check import CheckRequest, format_report, run_check
    from .engines import parse_engines
    from .engines.served import read_token

    tolerances = from_params(Tolerances, params)
    tolerances.check()
    named = parse_engines(engines, read_token(token_file) if token_file else None, threads) if engines else None
    request = CheckRequest(model_dir, None if prompt_dir is None else str(prompt_dir), from_params(TaskSpec, params),
                           data, named and tuple(named), tolerances, threads)
    report = run_check(request, log=err)
    err(format_report(report))
    if as_json:
        emit_json(report.to_json())
    ctx.exit(0 if report.passed else 1)


# --------------------------------------------------------------------------- bench
@cli.command(rules=(
    Rule("--server load-tests the served graph; drop {flags}", given=("server",), any_of=BenchOptions.LOCAL_ONLY),
    Rule("{flags} go with --server", absent=("server",), any_of=BenchOptions.SERVER_ONLY),
    Rule("--torch-model is the checkpoint of the torch baseline; drop it with --baseline none",
         given=("torch_model", ("baseline", "none"))),
    Rule("--e2e-dim sets the end-to-end tune, which --e2e-budget 0 skips; drop one of them",
         given=(("e2e_budget", 0), "e2e_dim"))))
@model_option()
@click_options(BenchOptions)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@click.pass_context
def bench(ctx, model_dir, as_json, **params):
    """Time engine calls per precision against PyTorch in the same process, and an end-to-end tune; or, with
    --server, load-test a served model (exit code 1 when a call failed)."""
    from .bench import format_bench, run_bench

    report = run_bench(from_params(BenchOptions, params, model_dir=model_dir), log=err)
    emit_json(report) if as_json else click.echo(format_bench(report))
    ctx.exit(1 if any(run["errors"] for run in report.get("load", [])) else 0)


# --------------------------------------------------------------------------- serving
@cli.command()
@click.option("--model", "model_dirs", required=True, multiple=True, type=click.Path(file_okay=False),
              help="Model directory to serve (repeatable: one server for several models, each under its name).")
@click.option("--name", "names", multiple=True, help="The name to serve each --model under, in their order [default: "
              "the export source's last path component]; clients give it as http://HOST:PORT/NAME.")
@click.option("--prompt", "prompts", multiple=True, type=click.Path(path_type=Path),
              help="A finished run (repeatable, one per model): its result is served beside its model as "
              "NAME.classify, a text classifier with dynamic batching (needs the deploy extra).")
@click_options(EngineOptions, only=LOCAL_ENGINE)
@click_options(ServeOptions)
@click.option("--token-file", type=click.Path(dir_okay=False),
              help="File holding a shared secret every request but health must send (triton-access-token).")
def serve(model_dirs, names, prompts, token_file, **params):
    """Serve the models' prompt graphs on Triton Inference Server until Ctrl-C or SIGTERM.

    Tune against it with `--server http://HOST:HTTP_PORT` (or grpc://HOST:GRPC_PORT) from a client directory;
    `predict --server URL --prompt RUN` labels texts with a run served by --prompt.
    """
    from .engines.served import read_token
    from .serving.server import serve as run_serve

    engine = from_params(EngineOptions, params).spec()
    run_serve(from_params(ServeOptions, params, model_dirs=tuple(model_dirs), names=tuple(names), engine=engine,
                          prompts=tuple(str(p) for p in prompts),
                          token=read_token(token_file) if token_file else None), log=err)


@cli.command("client-dir")
@model_option("Model directory.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Client directory to write.")
@click.option("--force", is_flag=True, help="Replace an earlier client directory in --out.")
@click.option("--force-any", is_flag=True, help="Replace --out even when it does not look like a client directory "
              "(everything in it is deleted).")
def client_dir(model_dir, out, force, force_any):
    """Write what a user of the served model needs: manifest.json and tokenizer.json, no graphs or weights."""
    from .engines.served import write_client_dir

    written = write_client_dir(model_dir, out, force, force_any, log=err)
    err(f"wrote {written}: use it as --model with --server URL")


@cli.command("triton-repo")
@model_option("Model directory.")
@click_options(RepoOptions)
def triton_repo(model_dir, **params):
    """Write a model repository for a stock tritonserver (onnxruntime backend): the production server.

    Run it with: tritonserver --model-repository OUT --disable-auto-complete-config (see docs/serving.md).
    """
    from .serving.repository import write_repo

    opts = from_params(RepoOptions, params, model_dir=model_dir)
    written = write_repo(opts, log=err)
    err(f"wrote {written}: tritonserver --model-repository {opts.out} --disable-auto-complete-config")


def main() -> None:
    cli(prog_name="bbt-onnx")


if __name__ == "__main__":
    main()
