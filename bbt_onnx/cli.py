"""`bbt-onnx`: thin click commands over the library. Progress and logs go to stderr, results to stdout.

Each option is generated from the config dataclass that owns it (`options.click_options`); rules between flags are
declared with the command (`Rule`); the work is a library function.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import click

from .version import __version__
from .choice import ChoicePolicy
from .data import DataSpec
from .demos import DemoSpec
from .errors import BBTError, SettingsError
from .deploy import DeployOptions
from .engines import EngineOptions
from .export_options import ExportOptions
from .fileio import dumps
from .jobs.bench import BenchOptions
from .jobs.check import Tolerances
from .jobs.sweep import SweepOptions
from .options import Group, Rule, click_options, from_params
from .progress import Progress, row_progress
from .serving.repository import RepoOptions
from .serving.server import ServeOptions
from .tasks import TaskSpec
from .tuning.config import TuneConfig


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

    export makes a prompt graph; tune learns a prompt with CMA-ES (BBT, or BBTv2) and keeps it only
    when it beats the plain template; evaluate, predict and report use runs; deploy ships one as an
    ONNX graph from text to label; check compares engines; bench times them; serve puts graphs on
    Triton (--server URL works through its API); triton-repo writes a production repository (and a
    KServe InferenceService); sweep runs a grid of tunes on Ray Tune or a Slurm job array.
    """


# --------------------------------------------------------------------------- export
@cli.command()
@click_options(ExportOptions)
@quiet_option
def export(quiet, **params):
    """Export a masked or causal LM to an ONNX prompt graph, check it against PyTorch, write its manifest."""
    from .jobs.export import run_export

    if quiet:  # transformers' and the hub's notes and progress bars too
        os.environ.update(TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1", TQDM_DISABLE="1")
    emit_json(run_export(from_params(ExportOptions, params), log=(lambda _m: None) if quiet else err))


# --------------------------------------------------------------------------- tune
TUNE_FLAGS = ("model_dir", "out", "force", "force_any", "precision", "seeds", "data_seed", *TaskSpec.__dataclass_fields__,
              *(f for f in DataSpec.__dataclass_fields__ if f != "seed"), *TuneConfig.__dataclass_fields__,
              *ChoicePolicy.__dataclass_fields__, *DemoSpec.__dataclass_fields__)


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
    Rule("--eval-every scores a dev set, and --no-dev has none; drop one of them", given=("no_dev", "eval_every")),
    Rule("--seeds names every seed of the run; drop --seed", given=("seeds", "seed")),
    Rule("--data-seed draws the k-shot split of --data; a --train file is used whole, so drop it",
         given=("train", "data_seed")),
    Rule("--track-uri goes with --track", given=("track_uri",), absent=("track",)),
    *ENGINE_RULES))
@model_option(required=False)
@click_options(TaskSpec)
@click_options(DemoSpec)
@click_options(DataSpec)
@click.option("--out", type=click.Path(file_okay=False), help="Run directory to write.")
@click_options(TuneConfig)
@click_options(ChoicePolicy)
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
              "are kept: files named like a run's own, such as log.jsonl, are refused, never replaced).")
@quiet_option
@click.pass_context
def tune(ctx, model_dir, out, resume, force, force_any, trust_checkpoint, quiet, seeds, data_seed, track, track_uri,
         **params):
    """Learn a continuous prompt with CMA-ES, using only forward calls of the exported graph.

    Before tuning, the plain template is scored on dev in every framing the model allows; after it, the tuned prompt
    (or the seeds' ensemble) is kept only when it beats the best of them on dev (--choose, --no-fallback). Writes
    prompt.npz (what was kept), run.json, log.jsonl, loss.png and checkpoint.npz into --out, prints the metrics JSON.
    """
    from .jobs.tune import Hooks, resume_request, tune as run_tune
    from .runs import interrupted_hint

    if resume:
        request = resume_request(resume, from_params(EngineOptions, params).spec())
    else:
        request = tune_request(model_dir, out, seeds, data_seed, params)

    progress = Progress(quiet)
    hooks = Hooks(log=(lambda m: None) if quiet else err, start=progress.start, event=progress.update,
                  tuned=progress.close)
    if track:
        from .tracking import track as tracked

        hooks = tracked(hooks, track, track_uri)
    try:
        outcome = run_tune(request, hooks, resume=bool(resume), force=force, force_any=force_any,
                           trust_checkpoint=trust_checkpoint)
    except KeyboardInterrupt:
        progress.close()
        err(interrupted_hint(request.out))
        ctx.exit(130)
    finally:
        progress.close()
    err(outcome.summary())
    emit_json(outcome.metrics)


def tune_request(model_dir, out, seeds, data_seed, params: dict):
    """The request tune's options make (the options are taken out of `params`)."""
    from .jobs.tune import TuneRequest

    task, engine = from_params(TaskSpec, params), from_params(EngineOptions, params).spec()
    config = from_params(TuneConfig, params)
    if seeds:
        config = replace(config, seed=seeds[0])
    data = from_params(DataSpec, params, seed=config.seed if data_seed is None else data_seed)
    demos = from_params(DemoSpec, params)
    return TuneRequest(model_dir, demos.apply(task.resolve(), data.seed, pool=True), data, config, str(out), engine,
                       seeds or (), from_params(ChoicePolicy, params), task.task_file, demos)


# --------------------------------------------------------------------------- sweep
@cli.command(rules=(Rule("--resume takes the sweep's own spec and folder; drop SPEC and --out",
                         given=("resume",), any_of=("spec", "out")),
                    Rule("give a SPEC and --out, or --resume DIR", absent=("resume", "spec")),
                    Rule("--out is required (the sweep's folder)", given=("spec",), absent=("out",))))
@click.argument("spec", required=False, type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="The sweep's folder: sweep.json, "
              "runs/TRIAL (one ordinary run directory a trial), logs/TRIAL.log.")
@click.option("--resume", type=click.Path(file_okay=False, path_type=Path), help="Continue a sweep with its own "
              "spec (the executor options are this command's): finished trials are kept, interrupted ones continue "
              "from their checkpoints, the rest start.")
@click_options(SweepOptions)
@click.option("--dry-run", is_flag=True, help="Build and check every trial, print their names and settings as JSON, "
              "and stop: nothing is written or run.")
@quiet_option
@click.pass_context
def sweep(ctx, spec, out, resume, dry_run, quiet, **params):
    """Run a grid of tunes (tasks x settings), each an ordinary run, as trials on Ray Tune or a Slurm job array.

    SPEC (YAML or JSON) holds `model`, `tasks` (a name for each, with its tune settings: task, data, template,
    ...), `settings` (tune settings every trial shares) and `grid` (settings to vary: every combination runs for
    every task). Settings are tune's options by name, e.g. budget: 400, k-shot: 16, seeds: [1, 2, 3]. Every trial is
    checked before the first starts. One line per finished trial on stderr; the summary JSON on stdout; exit code
    1 when a trial failed or did not run. `bbt-onnx report DIR` tabulates the sweep.
    """
    from .jobs.runners import open_runner
    from .jobs.sweep import SweepSpec, read_plan, read_spec, run_sweep

    options = from_params(SweepOptions, params).check()
    log = (lambda m: None) if quiet else err
    if resume:
        plan = read_plan(resume)
        folder, spec_of, cwd = resume, SweepSpec.from_json(plan["spec"], f"{resume}/sweep.json"), plan.get("cwd")
    else:
        folder, spec_of, cwd = out, read_spec(spec), os.getcwd()
    if dry_run:
        planned = sweep_of(folder, spec_of, options, cwd)
        err(f"{len(planned.trials)} trials checked; nothing was run")
        emit_json({"trials": [{"name": t.name, **t.request.sweep, "out": t.request.out} for t in planned.trials]})
        return
    runner = open_runner(options, log)  # a missing extra is refused before any trial is built
    try:
        summary = run_sweep(sweep_of(folder, spec_of, options, cwd), runner, resume=bool(resume), log=log)
    except KeyboardInterrupt:
        err(f"interrupted; continue with: bbt-onnx sweep --resume {folder}")
        ctx.exit(130)
    emit_json(summary)
    if summary["failed"] or summary["not_run"]:
        err(f"{len(summary['failed'])} failed, {len(summary['not_run'])} not run; continue with: "
            f"bbt-onnx sweep --resume {folder}")
        ctx.exit(1)


def sweep_of(folder: Path, spec, options, cwd: str):
    """The sweep: every trial's request built as tune builds it from its options, relative paths read from `cwd`."""
    from .jobs.sweep import RUNS, LOGS, Sweep, Trial, check_inputs, working_dir

    folder = folder.resolve()
    trials = []
    with working_dir(cwd):
        for plan in spec.trials():
            trial_options = dict(plan.options)
            if "server" not in trial_options:  # trials side by side each get their CPUs, not all of them
                trial_options.setdefault("threads", options.cpus_per_trial)
            request, tracker = trial_request(plan.name, spec.model, folder / RUNS / plan.name, trial_options)
            request = replace(request, sweep={"trial": plan.name, "task": plan.task, "point": plan.point})
            trials.append(Trial(plan.name, request, cwd, str(folder / LOGS / f"{plan.name}.log"), tracker))
        check_inputs(trials)
    return Sweep(folder, spec, options, trials)


def trial_request(name: str, model: str, out: Path, options: dict):
    """A trial's request, its options parsed and checked by the tune command itself (types, choices, rules), and
    its experiment tracker (track, track_uri) when it names one."""
    argv = ["--model", model, "--out", str(out)] + tune_argv(name, options)
    try:
        ctx = tune.make_context("tune", argv)
        for rule in tune.rules:
            message = rule.broken(ctx)
            if message:
                raise SettingsError(message)
        params = dict(ctx.params)
        tracker = (params["track"], params["track_uri"]) if params["track"] else None
        return tune_request(params.pop("model_dir"), out, params.pop("seeds"), params.pop("data_seed"),
                            params), tracker
    except click.ClickException as exc:
        raise SettingsError(f"trial {name}: {exc.format_message()}", "spec") from None
    except BBTError as exc:
        raise type(exc)(f"trial {name}: {exc}", "spec") from None


def tune_argv(name: str, options: dict) -> list[str]:
    """tune's command line for a trial's options, named as tune's flags are (task, k_shot, prompt_tokens, ...)."""
    params = {p.opts[0].lstrip("-").replace("-", "_"): p for p in tune.params if isinstance(p, click.Option)}
    argv: list[str] = []
    for key, value in options.items():
        param = params.get(key)
        if param is None:
            raise SettingsError(f"trial {name}: {key} is not a tune setting (see bbt-onnx tune --help)", "spec")
        if value is None:
            continue
        if param.is_flag or param.secondary_opts:
            if not isinstance(value, bool):
                raise SettingsError(f"trial {name}: {key} is a yes/no setting, got {value!r}", "spec")
            argv += [param.opts[0]] if value else param.secondary_opts[:1]
        elif isinstance(value, list) and key == "seeds":
            argv += [param.opts[0], ",".join(str(v) for v in value)]
        elif isinstance(value, (list, dict)):
            raise SettingsError(f"trial {name}: {key} takes one value, got {value!r}", "spec")
        else:
            argv += [param.opts[0], str(value)]
    return argv


# --------------------------------------------------------------------------- evaluate / predict
@cli.command(rules=ENGINE_RULES)
@model_option()
@click.option("--prompt", type=click.Path(path_type=Path), help="Run directory (or prompt.npz).")
@click.option("--data", required=True, help="Labelled CSV/TSV/JSONL file to score.")
@click.option("--no-prompt", is_flag=True, help="Score z = 0: the manual template, the untuned baseline.")
@click.option("--prompt-tokens", type=click.IntRange(0),
              help="Prompt slots for --no-prompt without a run [default: model's P].")
@click_options(TaskSpec)
@click_options(DemoSpec)
@click_options(EngineOptions)
@quiet_option
def evaluate(model_dir, prompt, data, no_prompt, prompt_tokens, quiet, **params):
    """Score a tuned prompt (or the bare template) on a labelled file; prints a metrics JSON. A run brings its
    demonstrations; a bare template takes them from --demos-file."""
    from .jobs.evaluate import evaluate as run_evaluate

    emit_json(run_evaluate(model_dir, data, prompt, from_params(TaskSpec, params),
                           from_params(EngineOptions, params).spec(), no_prompt, prompt_tokens,
                           progress=lambda total, label: row_progress(total, label, quiet),
                           demos=from_params(DemoSpec, params)))


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
    from .jobs.predict import predict as run_predict

    lines, count = run_predict(model_dir, prompt_dir, input_path, output, from_params(EngineOptions, params).spec(),
                               stdin=click.open_file("-", "rb") if input_path == "-" else None,  # stdin, as bytes
                               log=err, progress=lambda total, label: row_progress(total, label, quiet))
    if output:
        err(f"wrote {count} predictions to {output}")
    else:
        click.echo(lines, nl=False)


# --------------------------------------------------------------------------- deploy
@cli.command()
@model_option()
@click.option("--prompt", "prompt_dir", required=True, type=click.Path(path_type=Path),
              help="Run directory of a finished tune (or its prompt.npz).")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Folder to write: classifier.onnx (with --input ids also encode.py, recipe.json, tokenizer.json); "
              "with --format triton, a model repository.")
@click_options(DeployOptions)
@quiet_option
def deploy(model_dir, prompt_dir, out, quiet, **params):
    """Ship what a run kept: OUT/classifier.onnx, one graph from text to label (or, with --format triton, a Triton
    model repository serving it as NAME.classify).

    Inputs `text` [N] (and `text_b` for a pair task), outputs `probabilities` [N, K] and `label` [N]; the tokenizer,
    the template and the prompt are inside, so onnxruntime with onnxruntime-extensions runs it without bbt-onnx.
    Checked against predict on probe rows before OUT is written; prints a summary JSON."""
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
    ± std over seeds, the ensemble and the result each run kept (dev and test). A sweep's folder stands for all
    its runs (grouped by its task names and grid points)."""
    from .jobs.report import format_markdown, summarise

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
@click_options(DemoSpec)
@click_options(Tolerances)
@click_options(EngineOptions, only=("threads",))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.pass_context
def check(ctx, model_dir, prompt_dir, data, engines, token_file, threads, as_json, **params):
    """Score the same rows and prompts on several engines and compare each with CPU fp32.

    Exit code 0 when every engine is within tolerance (and every graph matches its sha256), 1 when one is
    not, 2 for a mistake. The table goes to stderr; --json prints the report on stdout.
    """
    from .jobs.check import CheckRequest, format_report, run_check
    from .engines import parse_engines
    from .engines.served import read_token

    tolerances = from_params(Tolerances, params)
    tolerances.check()
    named = parse_engines(engines, read_token(token_file) if token_file else None, threads) if engines else None
    request = CheckRequest(model_dir, None if prompt_dir is None else str(prompt_dir), from_params(TaskSpec, params),
                           from_params(DemoSpec, params), data, named and tuple(named), tolerances, threads)
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
    from .jobs.bench import format_bench, run_bench

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
@click.option("--token-file", "token", type=click.Path(dir_okay=False),  # `token`: ServeOptions' name for it
              help="File holding a shared secret every request but health must send (triton-access-token).")
def serve(model_dirs, names, prompts, token, **params):
    """Serve the models' prompt graphs on Triton Inference Server until Ctrl-C or SIGTERM.

    Tune against it with `--server http://HOST:HTTP_PORT` (or grpc://HOST:GRPC_PORT) from a client directory;
    `predict --server URL --prompt RUN` labels texts with a run served by --prompt.
    """
    from .engines.served import read_token
    from .serving.server import serve as run_serve

    engine = from_params(EngineOptions, params).spec()
    run_serve(from_params(ServeOptions, params, model_dirs=tuple(model_dirs), names=tuple(names), engine=engine,
                          prompts=tuple(str(p) for p in prompts),
                          token=read_token(token) if token else None), log=err)


@cli.command("client-dir")
@model_option("Model directory.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Client directory to write.")
@click.option("--force", is_flag=True, help="Replace an earlier client directory in --out.")
@click.option("--force-any", is_flag=True, help="Replace --out even when it does not look like a client directory "
              "(everything in it is deleted).")
def client_dir(model_dir, out, force, force_any):
    """Write what a user of the served model needs: manifest.json and tokenizer.json, no graphs or weights."""
    from .engines.served import write_client_dir

    err(f"wrote {write_client_dir(model_dir, out, force, force_any, log=err)}: use it as --model with --server URL")


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
