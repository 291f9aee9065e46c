"""`bbt-onnx`: thin click commands over the library. Progress and logs go to stderr, results to stdout."""

from __future__ import annotations

import errno
import functools
import sys
from contextlib import contextmanager
from pathlib import Path

import click

from . import __version__
from .errors import BBTError, DataError, SettingsError
from .fileio import dumps, storage_error
from .manifest import PRECISIONS
from .remote import DEFAULT_MAX_REQUEST

DEVICE = click.Choice(["cpu", "cuda"])
PRECISION = click.Choice(list(PRECISIONS))


class Group(click.Group):
    """User mistakes, ours (BBTError) and click's (usage errors), end as one `error:` line on stderr and exit
    code 2; a refused read or write too. Any other exception is a bug and keeps its traceback."""

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
    except (BBTError, click.ClickException) as exc:
        fail(ctx, exc.format_message() if isinstance(exc, click.ClickException) else str(exc))
    except OSError as exc:
        if exc.errno == errno.EPIPE:
            raise  # a closed pipe downstream (`| head`): click handles it quietly
        fail(ctx, str(storage_error(exc.filename, exc, "use") if exc.filename else exc))


def fail(ctx, message: str) -> None:
    click.echo("error: " + " ".join(message.split()), err=True)
    ctx.exit(2)


def err(msg: str) -> None:
    click.echo(msg, err=True)


def emit_json(obj) -> None:
    click.echo(dumps(obj, indent=2))


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="bbt-onnx")
def cli():
    """Black-Box Tuning of language models served as forward-only ONNX Runtime engines.

    export turns a Hugging Face model into a prompt graph; tune learns a continuous prompt
    with CMA-ES from a few labelled examples (BBT, or BBTv2 with --method bbtv2); evaluate and
    predict use it; check compares engines on the same prompts; bench times the engine against
    PyTorch. serve puts the graph on a Triton server, and --server URL tunes and scores through
    its API from a client-dir; triton-repo writes the production repository. Every mistake a
    user can make ends in one `error:` line, exit 2.
    """


# --------------------------------------------------------------------------- export
@cli.command()
@click.option("--model", "model", required=True, help="Hugging Face hub id, or a directory written by save_pretrained.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Model directory to write.")
@click.option("--prompt-tokens", default=50, show_default=True, help="Most soft-prompt tokens a run may use (P).")
@click.option("--opset", default=17, show_default=True, help="ONNX opset.")
@click.option("--fp16", is_flag=True, help="Also write a fused fp16 graph for CUDA (model.fp16.onnx).")
@click.option("--int8", is_flag=True, help="Also write an int8 graph for CPU (model.int8.onnx): dynamic for masked "
              "LMs, calibrated for decoders.")
@click.option("--int8-levels", type=click.Choice(["mixed", "two"]), default="mixed", show_default=True,
              help="Decoders' int8: one activation level on the middle layers' MLP inputs (about 2x fp32) or two "
              "levels everywhere (about 1.8x, logits closer to fp32).")
@click.option("--deep", is_flag=True, help="Also write the deep-prompt graphs BBTv2 tunes (tune --method bbtv2).")
@click.option("--kv-cache", is_flag=True, help="Decoders: also write the text/tail graph pair that computes the text "
              "once per run for suffix prompts (--prompt-position suffix).")
@click.option("--gguf-file", help="Load this GGUF file from the --model directory (needs the gguf extra).")
@click.option("--force", is_flag=True, help="Replace an existing --out directory.")
def export(model, out, prompt_tokens, opset, fp16, int8, int8_levels, deep, kv_cache, gguf_file, force):
    """Export a masked or causal LM to an ONNX prompt graph, check it against PyTorch, write its manifest."""
    try:
        from bbt_onnx_export import ExportOptions, export_model
    except ImportError as exc:
        raise BBTError(f"export needs the `export` extra (torch, transformers, onnx): pip install 'bbt-onnx[export]' "
                       f"after pip install torch==2.13.0 ({exc})") from None
    options = ExportOptions(model, out, prompt_tokens, opset, fp16, int8, force, gguf_file, deep, kv_cache,
                            int8_levels)
    manifest = export_model(options, log=err)
    summary = {name: {"file": g.file, **g.parity, **({"fused_ops": g.fused_ops} if g.fused_ops else {})}
               for name, g in manifest.graphs.items()}
    emit_json({"out": str(out), "kind": manifest.kind, "architecture": manifest.architecture,
               "prompt_tokens": manifest.prompt_tokens, "embedding_std": manifest.embedding_std, "graphs": summary})


# --------------------------------------------------------------------------- shared options
TASK_FLAGS = ("task_name", "template", "labels", "task_file", "metric", "bos", "chat", "prompt_position")


def task_options(f):
    """The options that name a task and its framing, handed to the command as one `task_args` tuple."""
    inner = f

    @functools.wraps(inner)
    def command(*args, **kwargs):
        return inner(*args, task_args=tuple(kwargs.pop(k) for k in TASK_FLAGS), **kwargs)

    f = command
    f = click.option("--prompt-position", type=click.Choice(["prefix", "suffix"]),
                     help="Decoders: prompt slots before the template (prefix) or after the text, before the "
                          "answer cue (suffix, whose text is computed once with a --kv-cache export) "
                          "[default: the task's, else prefix].")(f)
    f = click.option("--chat/--no-chat", default=None,
                     help="Decoders: wrap the template in the model's chat template [default: the task's, else no].")(f)
    f = click.option("--bos", type=click.Choice(["auto", "always", "never"]),
                     help="Decoders: BOS first as the tokenizer (or chat template) does, always, or never "
                          "[default: the task's, else auto].")(f)
    f = click.option("--metric", type=click.Choice(["accuracy", "f1"]), help="Override the task's metric.")(f)
    f = click.option("--task-file", type=click.Path(dir_okay=False), help="JSON with template, labels, metric.")(f)
    f = click.option("--labels", help="Custom verbalizer: name=word,... in class order, e.g. neg=bad,pos=great.")(f)
    f = click.option("--template", help='Custom template with {text}, {text_b}, {mask}, e.g. " {text} It was {mask} ."')(f)
    f = click.option("--task", "task_name", help="Preset: sst2, yelpp, agnews, dbpedia, mrpc, rte, snli.")(f)
    return f


def engine_options(f):
    """The in-process engine's options, and --server/--token-file for a served one, handed over as `remote`
    (None in process)."""
    inner = f

    @functools.wraps(inner)
    def command(*args, **kwargs):
        ctx = click.get_current_context()
        if not kwargs["server"] and given_on_command_line(ctx, "server_timeout"):
            raise SettingsError("--server-timeout goes with --server")
        if kwargs["server"]:
            local = [f"--{name}" for name in ("device", "precision", "threads") if given_on_command_line(ctx, name)]
            if local:
                raise SettingsError(f"{', '.join(local)} choose the in-process engine; with --server the server's "
                                    "graph and device are used, so drop them")
        return inner(*args, remote=remote_from(kwargs.pop("server"), kwargs.pop("token_file"),
                                               kwargs.pop("server_timeout")), **kwargs)

    f = command
    f = click.option("--server-timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
                     help="Seconds a request to --server may take (a busy server queues requests); a timed-out "
                          "request is retried up to 3 times.")(f)
    f = click.option("--token-file", type=click.Path(dir_okay=False),
                     help="File holding the server's access token (sent as the triton-access-token header).")(f)
    f = click.option("--server", help="Score on a Triton server (`bbt-onnx serve`, or a stock tritonserver over "
                                      "`bbt-onnx triton-repo`): http://HOST:PORT or grpc://HOST:PORT. --model may "
                                      "then be a client directory (`bbt-onnx client-dir`).")(f)
    f = click.option("--threads", type=click.IntRange(1), help="CPU threads for onnxruntime [default: all cores].")(f)
    f = click.option("--precision", type=PRECISION, default="fp32", show_default=True, help="Which exported graph.")(f)
    f = click.option("--device", type=DEVICE, default="cpu", show_default=True, help="onnxruntime execution provider.")(f)
    return f


def remote_from(server, token_file, timeout: float):
    from .remote import Remote, read_token

    if token_file and not server:
        raise SettingsError("--token-file goes with --server")
    if not server:
        return None
    return Remote(server, read_token(token_file) if token_file else None, timeout).check()


def get_task(task_name, template, labels, task_file, metric, bos, chat, prompt_position):
    from .tasks import resolve_task

    return resolve_task(task_name, template, labels, task_file, metric, bos, chat, prompt_position)


# --------------------------------------------------------------------------- tune
TUNE_FLAGS = ("model_dir", *TASK_FLAGS, "data", "train", "dev", "test",
              "k_shot", "out", "prompt_tokens", "intrinsic_dim", "popsize", "budget", "sigma", "alpha",
              "random_proj", "bound", "diagonal", "loss", "eval_every", "seed", "checkpoint_every", "precision",
              "max_length", "force", "prompt_init", "method")


@cli.command()
@click.option("--model", "model_dir", type=click.Path(file_okay=False), help="Model directory from `bbt-onnx export`.")
@task_options
@click.option("--data", help="Labelled pool (CSV/TSV/JSONL or hf:NAME) to draw k per class for train and dev from.")
@click.option("--train", type=click.Path(dir_okay=False), help="Explicit training file, used whole (no sampling).")
@click.option("--dev", type=click.Path(dir_okay=False), help="Explicit dev file.")
@click.option("--test", type=click.Path(dir_okay=False), help="Test file, scored once at the end.")
@click.option("--k-shot", default=16, show_default=True, help="Examples per class for train (and again for dev).")
@click.option("--out", type=click.Path(path_type=Path), help="Run directory to write.")
@click.option("--prompt-tokens", default=50, show_default=True, help="Soft-prompt tokens P.")
@click.option("--intrinsic-dim", default=500, show_default=True, help="Subspace dimension d.")
@click.option("--popsize", default=20, show_default=True, help="CMA-ES population per generation.")
@click.option("--budget", default=8000, show_default=True, help="API calls: one call = one candidate on the train set.")
@click.option("--sigma", default=1.0, show_default=True, help="CMA-ES initial step size.")
@click.option("--alpha", default=1.0, show_default=True, help="Scale of the normal projection.")
@click.option("--random-proj", type=click.Choice(["normal", "uniform"]), default="normal", show_default=True)
@click.option("--bound", default=0.0, show_default=True, help="Box z to [-bound, bound]; 0 is off.")
@click.option("--diagonal", is_flag=True, help="sep-CMA (diagonal covariance): far cheaper per generation.")
@click.option("--loss", type=click.Choice(["ce", "hinge", "perf"]), default="ce", show_default=True)
@click.option("--eval-every", default=100, show_default=True, help="Score the best-so-far prompt on dev every N calls.")
@click.option("--seed", default=42, show_default=True)
@click.option("--checkpoint-every", default=10, show_default=True, help="Generations between checkpoints; 0 is off.")
@click.option("--max-length", type=click.IntRange(8), help="Token limit per row [default: the model's].")
@click.option("--method", type=click.Choice(["bbt", "bbtv2"]), default="bbt", show_default=True,
              help="bbt: one prompt on the embeddings; bbtv2: a prompt on every layer, one CMA-ES per layer "
              "(needs a model exported with --deep).")
@click.option("--prompt-init", help="Text whose tokens fill the prompt slots (z = 0 is then the template with this "
              "text before it); its token count must equal --prompt-tokens [default: the model's placeholders].")
@engine_options
@click.option("--resume", type=click.Path(path_type=Path, file_okay=False), help="Continue an interrupted run.")
@click.option("--force", is_flag=True, help="Replace an earlier run in --out.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or notes.")
@click.pass_context
def tune(ctx, resume, quiet, device, threads, remote, task_args, **flags):
    """Learn a continuous prompt with CMA-ES, using only forward calls of the exported graph.

    Writes prompt.npz, run.json, log.jsonl and loss.png into --out, prints the metrics JSON.
    """
    from .data import DataSpec
    from .tuner import TuneConfig
    from .workflow import Hooks, TuneRequest, tune as run_tune

    if resume:
        given = [k for k in TUNE_FLAGS if given_on_command_line(ctx, k)]
        if given:
            raise SettingsError(f"--resume takes the run's own settings; drop "
                                f"{', '.join('--' + g.replace('_', '-') for g in given)}")
        from .runs import RunDir

        settings = RunDir.open_existing(resume).read_json()["settings"]
        request = TuneRequest.from_settings(settings, str(resume), device=device, threads=threads, remote=remote)
    else:
        if not flags["model_dir"]:
            raise SettingsError("--model is required")
        if not flags["out"]:
            raise SettingsError("--out is required (the run directory)")
        if flags["train"] and given_on_command_line(ctx, "k_shot"):
            raise SettingsError("--k-shot samples --data; a --train file is used whole, so drop one of them")
        if flags["train"] and not flags["dev"] and given_on_command_line(ctx, "eval_every"):
            raise SettingsError("--eval-every scores a dev set, and --train without --dev has none; add --dev or "
                                "drop --eval-every")
        task = get_task(*task_args)
        config = TuneConfig(**{k: flags[k] for k in ("prompt_tokens", "intrinsic_dim", "popsize", "budget", "sigma",
                                                      "alpha", "random_proj", "bound", "diagonal", "loss",
                                                      "eval_every", "seed", "checkpoint_every", "prompt_init",
                                                      "max_length", "method")})
        data = DataSpec(flags["data"], flags["train"], flags["dev"], flags["test"], flags["k_shot"], flags["seed"])
        request = TuneRequest(flags["model_dir"], task, data, config, str(flags["out"]), device, flags["precision"],
                              threads, remote)

    progress = Progress(quiet)
    hooks = Hooks(log=(lambda m: None) if quiet else err, start=progress.start, event=progress.update)
    try:
        outcome = run_tune(request, hooks, resume=bool(resume), force=bool(flags.get("force")))
    except KeyboardInterrupt:
        progress.close()
        from .runs import CHECKPOINT

        if (Path(request.out) / CHECKPOINT).is_file():
            err(f"interrupted; continue with: bbt-onnx tune --resume {request.out}")
        else:
            err("interrupted before the first checkpoint, so there is nothing to resume; run the same command "
                "again to start over")
        ctx.exit(130)
    finally:
        progress.close()
    m = outcome.metrics
    dev = "n/a" if m["best_dev_metric"] is None else f"{m['best_dev_metric']:.4f}"
    test = "n/a" if m["test_metric"] is None else f"{m['test_metric']:.4f}"
    err(f"done: {m['api_calls']} calls in {m['wall_seconds']:.1f}s ({m['calls_per_second']:.1f}/s), train loss "
        f"{m['train_loss_initial']:.4f} -> {m['train_loss_final']:.4f}, dev {m['metric_name']} {dev}, "
        f"test {test}; wrote {outcome.run_dir}")
    emit_json(m)


def given_on_command_line(ctx, name: str) -> bool:
    return ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE


class Progress:
    """A progress bar on stderr: calls, best loss, dev metric."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar = None
        self.dev = None

    def start(self, total: int, done: int) -> None:
        if self.quiet:
            return
        self.bar = click.progressbar(length=total, label="tuning", file=sys.stderr, show_pos=True,
                                     show_percent=False, item_show_func=lambda s: s)
        self.bar.__enter__()
        if done:
            self.bar.update(done)

    def update(self, event) -> None:
        if self.bar is None:
            return
        if event.dev_metric is not None:
            self.dev = event.dev_metric
        dev = "-" if self.dev is None else f"{self.dev:.3f}"
        self.bar.update(event.calls - self.bar.pos, f"loss {event.best_loss_so_far:.4f}  dev {dev}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


# --------------------------------------------------------------------------- evaluate / predict
def load_run_prompt(prompt_dir, no_prompt, task_args, prompt_tokens):
    """The tuned prompt of a run (z = 0 in its place with --no-prompt), or None when there is no run."""
    from .prompt import TunedPrompt

    if prompt_dir is None:
        if not no_prompt:
            raise SettingsError("give --prompt RUN_DIR, or --no-prompt with a task to score the manual template")
        return None
    if any(a is not None for a in task_args):
        raise SettingsError("--task/--template/--labels/--task-file/--metric/--bos/--chat/--prompt-position come "
                            "from the run with --prompt; drop them")
    if prompt_tokens is not None:
        raise SettingsError("--prompt-tokens comes from the run with --prompt; drop it")
    prompt = TunedPrompt.load(prompt_dir)
    return TunedPrompt.zero(prompt.projection, prompt.task) if no_prompt else prompt


def template_prompt(model, task_args, prompt_tokens):
    """z = 0 without a run: the manual template after the model's placeholder tokens."""
    from .prompt import TunedPrompt
    from .subspace import ProjectionSpec

    task = get_task(*task_args)
    m = model.manifest
    if prompt_tokens is not None and prompt_tokens > m.prompt_tokens:
        raise SettingsError(f"--prompt-tokens {prompt_tokens} is more than the {m.prompt_tokens} this model was "
                            "exported for")
    spec = ProjectionSpec(0, 1, prompt_tokens if prompt_tokens is not None else m.prompt_tokens, m.hidden_size,
                          m.embedding_std)
    return TunedPrompt.zero(spec, task)


@cli.command()
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False))
@click.option("--prompt", "prompt_dir", type=click.Path(path_type=Path), help="Run directory (or prompt.npz).")
@click.option("--data", required=True, help="Labelled CSV/TSV/JSONL file to score.")
@click.option("--no-prompt", is_flag=True, help="Score z = 0: the manual template, the untuned baseline.")
@click.option("--prompt-tokens", type=click.IntRange(0),
              help="Prompt slots for --no-prompt without a run [default: model's P].")
@task_options
@engine_options
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def evaluate(model_dir, prompt_dir, data, no_prompt, prompt_tokens, task_args, device, precision, threads, remote,
             quiet):
    """Score a tuned prompt (or the bare template) on a labelled file; prints a metrics JSON."""
    from .data import check_labels, read_examples
    from .model import Model

    prompt = load_run_prompt(prompt_dir, no_prompt, task_args, prompt_tokens)
    model = Model.load(model_dir, device=device, precision=precision, threads=threads,
                       deep=prompt is not None and prompt.deep, remote=remote)
    prompt = prompt or template_prompt(model, task_args, prompt_tokens)
    rows = read_examples(data)
    check_labels(rows, prompt.task.label_keys, data)
    prompt.check_model(model)
    enc = prompt.encoder(model).encode(rows)  # every row checked before the progress bar starts
    with row_progress(len(rows), "scoring", quiet) as advance:
        result = prompt.evaluate(model, enc, on_batch=advance)
    result.update(task=prompt.task.name, prompt="none (z = 0)" if no_prompt else str(prompt_dir),
                  provider=model.engine.provider)
    emit_json(result)


@cli.command()
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False))
@click.option("--prompt", "prompt_dir", required=True, type=click.Path(path_type=Path), help="Run directory.")
@click.option("--input", "input_path", required=True,
              help="CSV/TSV/JSONL with a text column, a .txt with one text per line, or - for stdin.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), help="Write JSONL here [default: stdout].")
@engine_options
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def predict(model_dir, prompt_dir, input_path, output, device, precision, threads, remote, quiet):
    """Label texts with a tuned prompt; writes JSONL: text, label and per-label probabilities."""
    from .fileio import check_writable
    from .model import Model
    from .prompt import TunedPrompt

    if output:
        check_writable(output)
    prompt = TunedPrompt.load(prompt_dir)
    model = Model.load(model_dir, device=device, precision=precision, threads=threads, deep=prompt.deep,
                       remote=remote)
    prompt.check_model(model)
    rows = read_input(input_path)
    enc = prompt.encoder(model).encode(rows)  # every row checked before the progress bar starts
    with row_progress(len(rows), "predicting", quiet) as advance:
        preds = prompt.predict(model, enc, on_batch=advance)
    lines = "".join(dumps({"text": r.text, **({"text_b": r.text_b} if r.text_b else {}), "label": p.label,
                                "probabilities": p.probabilities}) + "\n" for r, p in zip(rows, preds))
    if output:
        from .fileio import write_text_atomic

        write_text_atomic(output, lines)
        err(f"wrote {len(preds)} predictions to {output}")
    else:
        click.echo(lines, nl=False)


@contextmanager
def row_progress(total: int, label: str, quiet: bool):
    """A progress bar over rows on stderr; yields the function that advances it."""
    if quiet:
        yield lambda _n: None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True) as bar:
        yield bar.update


def read_input(path: str):
    """Rows to label: a data file, or text lines / JSON lines from a .txt file or stdin."""
    from .data import parse_lines, read_examples

    if path != "-" and not path.endswith(".txt"):
        return read_examples(path, need_label=False)
    if path == "-":
        raw, source = click.get_binary_stream("stdin").read(), "stdin"
    else:
        try:
            raw, source = Path(path).read_bytes(), path
        except OSError as exc:
            raise storage_error(path, exc, "read") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{source} is not UTF-8 text (byte {exc.start}: {raw[exc.start:exc.start + 1]!r})") from None
    return parse_lines(text, source)


# --------------------------------------------------------------------------- check
@cli.command()
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False))
@click.option("--prompt", "prompt_dir", type=click.Path(path_type=Path),
              help="Run directory: its tuned prompt and z = 0 [default: z = 0 and three random prompts].")
@click.option("--data", help="Rows to score (labelled for a metric) [default: built-in sample rows].")
@click.option("--engines", help="Comma-separated DEVICE:PRECISION or server URL, e.g. cpu:fp32,cpu:int8,cuda:fp16,"
              "http://127.0.0.1:8000 [default: every graph of the model on every provider installed; those that "
              "cannot run are skipped].")
@click.option("--token-file", type=click.Path(dir_okay=False), help="Access token for the servers in --engines.")
@task_options
@click.option("--fp32-max-diff", default=1e-3, show_default=True, help="fp32 engines: largest max abs logit diff.")
@click.option("--fp32-agreement", default=1.0, show_default=True, help="fp32 engines: least prediction agreement.")
@click.option("--lowp-agreement", default=0.98, show_default=True, help="fp16 and int8: least prediction agreement.")
@click.option("--lowp-metric-delta", default=0.01, show_default=True,
              help="fp16 and int8: largest change of the task metric (with labelled rows).")
@click.option("--threads", type=click.IntRange(1), help="CPU threads for onnxruntime [default: all cores].")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.pass_context
def check(ctx, model_dir, prompt_dir, data, engines, token_file, task_args, fp32_max_diff, fp32_agreement,
          lowp_agreement, lowp_metric_delta, threads, as_json):
    """Score the same rows and prompts on several engines and compare each with CPU fp32.

    Exit code 0 when every engine is within tolerance (and every graph matches its sha256), 1 when one is
    not, 2 for a mistake. The table goes to stderr; --json prints the report on stdout.
    """
    from . import check as c
    from .data import check_labels, read_examples
    from .encoding import load_tokenizer
    from .engines import ALL_ENGINES, parse_engines
    from .manifest import load_manifest
    from .model import Model

    tolerances = c.Tolerances(fp32_max_diff, fp32_agreement, lowp_agreement, lowp_metric_delta)
    tolerances.check()
    prompt = load_run_prompt(prompt_dir, prompt_dir is None, task_args, None)
    from .remote import read_token

    named = parse_engines(engines, read_token(token_file) if token_file else None) if engines else []
    if token_file and not any(spec.remote for spec in named):
        raise SettingsError("--token-file goes with a server URL in --engines")
    manifest = load_manifest(model_dir)
    tokenizer = load_tokenizer(manifest)
    if prompt is None:
        zero = template_prompt(Model(manifest, tokenizer, None), task_args, None)
        prompts = [("z=0", zero)] + [(f"random{i}", p) for i, p in enumerate(c.random_prompts(zero, manifest), 1)]
    else:
        from .prompt import TunedPrompt

        prompt.check_model(Model(manifest, tokenizer, None))
        prompts = [("tuned", prompt), ("z=0", TunedPrompt.zero(prompt.projection, prompt.task))]
    task = prompts[0][1].task
    rows = read_examples(data) if data else c.sample_rows(task.uses_text_b)
    if data:
        check_labels([r for r in rows if r.label is not None], task.label_keys, data)
    specs = [(s, True) for s in named] or [(s, False) for s in ALL_ENGINES]
    report = c.check_engines(manifest, tokenizer, prompts, rows, specs, tolerances, threads, log=err)
    err(c.format_report(report))
    if as_json:
        emit_json(report.to_json())
    ctx.exit(0 if report.passed else 1)


# --------------------------------------------------------------------------- bench
@cli.command()
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False))
@click.option("--device", type=DEVICE, default="cpu", show_default=True)
@click.option("--precision", "precisions", type=PRECISION, multiple=True,
              help="Graphs to time (repeatable) [default: fp32 and int8 on cpu, fp16 and fp32 on cuda, those exported].")
@click.option("--batch", default=64, show_default=True, type=click.IntRange(1),
              help="Sequences per engine call (candidates x up to 32 texts).")
@click.option("--seq", default=80, show_default=True, type=click.IntRange(1), help="Tokens per sequence.")
@click.option("--baseline", type=click.Choice(["torch", "none"]), default="torch", show_default=True,
              help="Time Hugging Face transformers on the same inputs (eager and SDPA; needs torch).")
@click.option("--torch-model", help="Checkpoint for the torch baseline [default: the manifest's source].")
@click.option("--repeat", default=3, show_default=True, type=click.IntRange(1),
              help="Timed calls per measurement (median).")
@click.option("--e2e-budget", type=click.IntRange(0),
              help="API calls of the end-to-end tune (popsize 20, 32 texts); 0 skips it [default: 40 on cpu, 2000 on cuda].")
@click.option("--e2e-dim", default=500, show_default=True, type=click.IntRange(1), help="d of the end-to-end tune.")
@click.option("--threads", type=click.IntRange(1), help="CPU threads for onnxruntime [default: all cores].")
@click.option("--suffix-data", help="Rows (CSV/TSV/JSONL) for the suffix-prompt timing of a --kv-cache decoder: "
              "32 drawn at random [default: synthetic reviews].")
@click.option("--server", help="Load-test this Triton server instead (http://HOST:PORT or grpc://HOST:PORT): "
              "latency p50/p99, calls/s, errors and bytes per call at each --clients count, and the API overhead "
              "against the same call in process.")
@click.option("--token-file", type=click.Path(dir_okay=False), help="The server's access token.")
@click.option("--server-timeout", type=click.FloatRange(min=0, min_open=True), default=300.0, show_default=True,
              help="With --server: seconds a request may take (queued behind the other clients' included).")
@click.option("--clients", default="1,4,8", show_default=True, help="With --server: concurrent clients, one run each.")
@click.option("--calls", default=20, show_default=True, type=click.IntRange(1),
              help="With --server: calls per client.")
@click.option("--max-seconds", default=120.0, show_default=True, type=click.FloatRange(min=1),
              help="With --server: time limit of each run.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@click.pass_context
def bench(ctx, model_dir, device, precisions, batch, seq, baseline, torch_model, repeat, e2e_budget, e2e_dim, threads,
          suffix_data, server, token_file, server_timeout, clients, calls, max_seconds, as_json):
    """Time engine calls per precision against PyTorch in the same process, and an end-to-end tune; or, with
    --server, load-test a served model."""
    from . import bench as b
    from .manifest import load_manifest
    from .model import Model

    local_only = {"precisions": "--precision", "baseline": "--baseline", "torch_model": "--torch-model",
                  "e2e_budget": "--e2e-budget", "e2e_dim": "--e2e-dim", "suffix_data": "--suffix-data"}
    server_only = {"clients": "--clients", "calls": "--calls", "max_seconds": "--max-seconds",
                   "token_file": "--token-file", "server_timeout": "--server-timeout"}
    if server:
        from .load import format_load, parse_clients, server_report

        given = [flag for name, flag in local_only.items() if given_on_command_line(ctx, name)]
        if given:
            raise SettingsError(f"--server load-tests the served graph; drop {', '.join(given)}")
        report = server_report(model_dir, remote_from(server, token_file, server_timeout), device, batch, seq, repeat,
                               threads, parse_clients(clients), calls, max_seconds, log=err)
        emit_json(report) if as_json else click.echo(format_load(report))
        return
    given = [flag for name, flag in server_only.items() if given_on_command_line(ctx, name)]
    if given:
        raise SettingsError(f"{', '.join(given)} go with --server")
    if torch_model and baseline == "none":
        raise SettingsError("--torch-model is the checkpoint of the torch baseline; drop it with --baseline none")
    if e2e_budget == 0 and given_on_command_line(click.get_current_context(), "e2e_dim"):
        raise SettingsError("--e2e-dim sets the end-to-end tune, which --e2e-budget 0 skips; drop one of them")
    manifest = load_manifest(model_dir)
    if not precisions:
        wanted = ("fp32", "int8") if device == "cpu" else ("fp16", "fp32")
        precisions = tuple(p for p in wanted if p in manifest.graphs)
    cache_precision = next((p for p in precisions if manifest.has_cache_graphs(p)), None)
    if suffix_data and cache_precision is None:
        raise SettingsError("--suffix-data times the cached pair of graphs, and this model has none; re-export a "
                            "decoder with --kv-cache")
    prompts, enc = b.synthetic_inputs(manifest, batch, seq)
    results, models = [], {}
    for precision in precisions:
        models[precision] = Model.load(model_dir, device=device, precision=precision, threads=threads)
        err(f"timing {precision} on {device}: {batch} sequences x {seq} tokens")
        results.append(b.time_engine(models[precision].engine, precision, device, prompts, enc, repeat))
        results[-1].memcpy_nodes = b.memcpy_nodes(manifest, precision, device)

    torch_note = None
    if baseline == "torch":
        torch_note = torch_baseline(manifest, torch_model or manifest.source, prompts, enc, device, results, repeat)
        if torch_note:
            err(f"note: {torch_note}")
    report = {"model": str(model_dir), "architecture": manifest.architecture, "device": device,
              "results": [r.to_json() for r in results], "torch_baseline": torch_note or "measured"}
    report["optimizer_ms_per_generation"] = b.optimizer_costs(e2e_dim, 20)
    if cache_precision:
        rows = suffix_rows(suffix_data)
        p = min(10, manifest.prompt_tokens)
        err(f"timing a suffix prompt ({cache_precision}): {len(rows)} rows, P={p}, popsize 10, full vs cached text")
        report["suffix_cache"] = b.suffix_cache(manifest, cache_precision, device, rows, p, 10, repeat, threads)
    if e2e_budget is None:
        e2e_budget = 40 if device == "cpu" else 2000
    if e2e_budget:
        fast = min(results, key=lambda r: r.ms_per_call).precision if results else "fp32"
        err(f"end to end: {e2e_budget} calls, popsize 20, d={e2e_dim}, {fast}")
        report["end_to_end"] = {"precision": fast, **b.end_to_end(
            models.get(fast) or Model.load(model_dir, device=device, precision=fast, threads=threads), e2e_budget, 20,
            e2e_dim, manifest.prompt_tokens, words=max(1, (seq - manifest.prompt_tokens) // 2))}
    if as_json:
        emit_json(report)
    else:
        click.echo(b.format_report(report))


def suffix_rows(path: str | None, count: int = 32) -> list:
    """`count` rows drawn at random from `path`, or synthetic reviews of about an MR sentence's length."""
    import random

    if path is None:
        from .synthetic import sentiment_examples

        return sentiment_examples(count, seed=0, min_words=12, max_words=30)
    from .data import Example, read_examples

    rows = read_examples(path)
    return [Example(r.text, r.text_b) for r in random.Random(0).sample(rows, min(count, len(rows)))]  # text only


def torch_baseline(manifest, source, prompts, enc, device, results, repeat) -> str | None:
    """Fill the torch columns of `results`; a reason when the baseline cannot run."""
    try:
        from bbt_onnx_export.baseline import VARIANTS, torch_ms
    except ImportError as exc:
        return f"no torch baseline: {exc}"
    fp16 = device == "cuda"
    timings = {}
    for attn in VARIANTS:
        err(f"timing torch {attn} ({'fp16' if fp16 else 'fp32'}) on {device}")
        try:
            timings[attn] = torch_ms(manifest, source, prompts, enc, device, fp16, attn, repeat)
        except BBTError as exc:
            return f"no torch baseline: {exc}"
    best = min(timings, key=timings.get)
    for r in results:
        r.torch_ms_per_call, r.torch_variant = timings[best], f"{best} {'fp16' if fp16 else 'fp32'}"
        r.ratio_vs_torch = timings[best] / r.ms_per_call
    return None


# --------------------------------------------------------------------------- serving
@cli.command()
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False), help="Model directory to serve.")
@click.option("--device", type=DEVICE, default="cpu", show_default=True, help="onnxruntime execution provider.")
@click.option("--precision", type=PRECISION, default="fp32", show_default=True, help="Which exported graph.")
@click.option("--threads", type=click.IntRange(1), help="CPU threads for onnxruntime [default: all cores].")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; one other machines can reach needs --token-file.")
@click.option("--http-port", default=8000, show_default=True, type=int)
@click.option("--grpc-port", default=8001, show_default=True, type=int)
@click.option("--metrics-port", default=8002, show_default=True, type=int)
@click.option("--token-file", type=click.Path(dir_okay=False),
              help="File holding a shared secret every request but health must send (triton-access-token).")
@click.option("--max-request", default=DEFAULT_MAX_REQUEST, show_default=True, type=int,
              help="Largest request, as prompts x rows x tokens (C x N x T).")
def serve(model_dir, device, precision, threads, host, http_port, grpc_port, metrics_port, token_file, max_request):
    """Serve the model's prompt graph on Triton Inference Server (PyTriton) until Ctrl-C or SIGTERM.

    Tune against it with `--server http://HOST:HTTP_PORT` (or grpc://HOST:GRPC_PORT) from a client directory.
    """
    from .remote import read_token
    from .serve import ServeOptions, serve as run_serve

    opts = ServeOptions(model_dir, device, precision, host, http_port, grpc_port, metrics_port,
                        read_token(token_file) if token_file else None, max_request, threads)
    run_serve(opts, log=err)


@cli.command("client-dir")
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False), help="Model directory.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Client directory to write.")
@click.option("--force", is_flag=True, help="Replace a non-empty --out.")
def client_dir(model_dir, out, force):
    """Write what a user of the served model needs: manifest.json and tokenizer.json, no graphs or weights."""
    from .remote import write_client_dir

    written = write_client_dir(model_dir, out, force)
    err(f"wrote {written}: use it as --model with --server URL")


@cli.command("triton-repo")
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False), help="Model directory.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Model repository to write.")
@click.option("--precision", type=PRECISION, help="Which graph [default: fp16 when exported, else fp32].")
@click.option("--kind", type=click.Choice(["gpu", "cpu"]), default="gpu", show_default=True,
              help="Instance kind (KIND_GPU or KIND_CPU).")
@click.option("--instances", default=1, show_default=True, type=int, help="Model instances per server.")
@click.option("--tensorrt", is_flag=True, help="Add onnxruntime's TensorRT accelerator (fp16, engine cache).")
@click.option("--max-request", default=DEFAULT_MAX_REQUEST, show_default=True, type=int,
              help="Largest request the client sends, as prompts x rows x tokens (C x N x T).")
@click.option("--force", is_flag=True, help="Replace a non-empty --out.")
def triton_repo(model_dir, out, precision, kind, instances, tensorrt, max_request, force):
    """Write a model repository for a stock tritonserver (onnxruntime backend): the production server.

    Run it with: tritonserver --model-repository OUT --disable-auto-complete-config (see docs/serving.md).
    """
    from .triton_repo import RepoOptions, write_repo

    written = write_repo(RepoOptions(model_dir, str(out), precision, kind, instances, tensorrt, max_request, force))
    err(f"wrote {written}: tritonserver --model-repository {out} --disable-auto-complete-config")


def main() -> None:
    cli(prog_name="bbt-onnx")


if __name__ == "__main__":
    main()
