"""The job commands of `genq` (run, jobs, files, fine-tune, keys list), on genq.client.

Progress bars and tables go to stderr (rich), results to stdout: text, saved
paths, or with --json the API's JSON, so `genq ... --json | jq` works.
Exit codes: 0 the job succeeded (or the command did what it was asked),
1 the job failed or was canceled, 2 a usage or client error (a bad argument,
an error answer, the API unreachable).

The parsers are built here with argparse alone; httpx and rich are imported
only when a command runs, so `genq up` and `genq worker` load neither."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

OK, JOB_FAILED, USAGE = 0, 1, 2


def add_parsers(sub) -> None:
    """The job commands' subparsers, on `genq`'s."""
    run = sub.add_parser("run", help="run a model: submit a job, show its progress, print or save its output")
    run.add_argument("model", help="a model name (genq models: GET /v1/models)")
    run.add_argument("-i", "--input", action="append", default=[], metavar="KEY=VALUE",
                     help="an input field; VALUE is JSON when it parses as JSON (7, true, [1,2]) else a string; "
                          "@PATH reads a file; KEY may be dotted (hyperparameters.epochs=2). Repeat for more")
    run.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                     help="wait for the job and show its output (default); --no-wait prints the job's id at once")
    run.add_argument("-o", "--output-dir", default=".", help="where an image job's files are saved (default .)")
    run.add_argument("--priority", type=int, help="-100 to 100: orders your own jobs")
    _json_flag(run)

    jobs = sub.add_parser("jobs", help="list, read, watch and cancel your jobs")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", required=True)
    ls = jobs_sub.add_parser("ls", help="your jobs, newest first")
    ls.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "canceled"])
    ls.add_argument("--model")
    ls.add_argument("--type", help="a model family (text-generation, image-generation, ...) or fine-tune")
    ls.add_argument("-n", "--limit", type=int, default=20, help="most jobs shown (default 20; 0: every one)")
    _json_flag(ls)
    get = jobs_sub.add_parser("get", help="one job; exit 1 if it failed or was canceled")
    get.add_argument("job_id")
    _json_flag(get)
    watch = jobs_sub.add_parser("watch", help="follow a job to its end: progress bar, text as it is written")
    watch.add_argument("job_id")
    watch.add_argument("-o", "--output-dir", help="save an image job's files here when it succeeds")
    _json_flag(watch, "print each event as a line of JSON instead")
    cancel = jobs_sub.add_parser("cancel", help="cancel a job")
    cancel.add_argument("job_id")
    _json_flag(cancel)
    rm = jobs_sub.add_parser("rm", help="delete finished jobs, with their events and outputs")
    rm.add_argument("job_ids", nargs="+", metavar="job_id")

    files = sub.add_parser("files", help="upload fine-tuning datasets")
    files_sub = files.add_subparsers(dest="files_command", required=True)
    upload = files_sub.add_parser("upload", help="upload a JSONL dataset; prints its file id")
    upload.add_argument("path")
    upload.add_argument("--purpose", default="fine-tune")
    _json_flag(upload)
    files_rm = files_sub.add_parser("rm", help="delete uploaded files and their content")
    files_rm.add_argument("file_ids", nargs="+", metavar="file_id")

    ft = sub.add_parser("fine-tune", help="fine-tune a text model")
    ft_sub = ft.add_subparsers(dest="fine_tune_command", required=True)
    create = ft_sub.add_parser("create", help="upload a dataset (or name an uploaded file) and start a fine-tune")
    create.add_argument("--model", required=True, help="the base model (a text-generation model)")
    create.add_argument("--file", required=True, help="a JSONL dataset to upload, or the id of an uploaded file")
    create.add_argument("--method", choices=["lora", "full", "dpo", "dpo-full"],
                        help="lora or full: supervised; dpo or dpo-full: preference pairs")
    create.add_argument("--validation-file", help="a JSONL dataset to upload, or the id of an uploaded file, "
                                                  "in the training file's format: its loss is reported as it trains")
    create.add_argument("--epochs", type=int)
    create.add_argument("--max-steps", type=int)
    create.add_argument("--learning-rate", type=float)
    create.add_argument("--batch-size", type=int)
    create.add_argument("--warmup-steps", type=int)
    create.add_argument("--beta", type=float, help="DPO's beta (methods dpo, dpo-full)")
    create.add_argument("--suffix", help="part of the new model's name: <base>:ft-<suffix>-<id>")
    create.add_argument("--watch", action="store_true", help="follow it: a bar with step and loss")
    _json_flag(create)


def _json_flag(parser, help: str = "print the API's JSON instead of a table or summary") -> None:
    parser.add_argument("--json", action="store_true", help=help)


def main(args) -> int:
    """Run a job command; every error becomes a message on stderr and exit 2."""
    from genq.client import errors

    try:
        with _client() as client:
            return COMMANDS[_name(args)](client, args)
    except errors.APIError as exc:
        fields = [f"{e.get('field')}: {e.get('message')}" for e in exc.errors]
        _fail(f"{exc.status} {exc.title}" + ("" if fields else f": {exc.detail}"), fields)
    except (errors.GenqError, UsageError, OSError, ValueError) as exc:  # ValueError: a bad GENQ_URL or id
        _fail(str(exc))
    except KeyboardInterrupt:
        print("interrupted; a job already submitted goes on (genq jobs cancel ID stops it)", file=sys.stderr)
        return 130
    return USAGE


def _fail(message: str, details: list[str] = ()) -> None:
    print(f"genq: {message}", file=sys.stderr)
    for line in details:
        print(f"  {line}", file=sys.stderr)


class UsageError(Exception):
    pass


def _name(args) -> str:
    sub = {"jobs": "jobs_command", "files": "files_command", "fine-tune": "fine_tune_command",
           "keys": "keys_command"}.get(args.command)
    return f"{args.command} {getattr(args, sub)}" if sub else args.command


def _client():
    """GENQ_URL and GENQ_API_KEY; without a key, the one `genq up` keeps in
    GENQ_HOME (~/.genq) on this machine, so its user needs to set nothing."""
    from genq.client import Client

    key = os.environ.get("GENQ_API_KEY")
    if not key:
        home = Path(os.environ.get("GENQ_HOME") or Path.home() / ".genq").expanduser()
        try:
            key = (home / "api-key").read_text().strip() or None
        except OSError:
            key = None
    return Client(api_key=key)


def parse_inputs(pairs: list[str]) -> dict:
    """-i KEY=VALUE pairs as the input object (see `genq run --help`)."""
    out: dict = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"-i {pair!r}: expected KEY=VALUE")
        if raw.startswith("@"):
            try:
                value = Path(raw[1:]).read_text(encoding="utf-8").removesuffix("\n")
            except OSError as exc:
                raise UsageError(f"-i {key}=@{raw[1:]}: cannot read it: {exc.strerror}") from None
        else:
            try:
                value = json.loads(raw)
            except ValueError:
                value = raw
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UsageError(f"-i {pair!r}: {part} is already set to a value")
        node[leaf] = value
    return out


def _print_json(value) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _exit_code(job) -> int:
    return JOB_FAILED if job.status in ("failed", "canceled") else OK


# --- commands ----------------------------------------------------------------

def cmd_run(client, args) -> int:
    job = client.jobs.create(args.model, parse_inputs(args.input), priority=args.priority)
    if not args.wait:
        _print_json(job.raw) if args.json else print(job.id)
        return OK
    job, streamed = follow(client, job, quiet=args.json)
    return finish(job, args.output_dir, args.json, streamed)


def cmd_jobs_ls(client, args) -> int:
    jobs = []
    for job in client.jobs.list(status=args.status, model=args.model, type=args.type,
                                page_size=min(args.limit, 100) if args.limit > 0 else 100):
        jobs.append(job)
        if args.limit and len(jobs) >= args.limit:
            break
    if args.json:
        _print_json([j.raw for j in jobs])
        return OK
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    table.add_column("ID", no_wrap=True, min_width=32)
    for column in ("MODEL", "STATUS", "PROGRESS", "CREATED"):
        table.add_column(column)
    for j in jobs:
        table.add_row(j.id, j.model, _status(j.status), _progress_text(j.progress), (j.created_at or "")[:19])
    Console().print(table)
    return OK


def cmd_jobs_get(client, args) -> int:
    job = client.jobs.get(args.job_id)
    if args.json:
        _print_json(job.raw)
    else:
        from rich.console import Console

        console = Console()
        console.print(f"[bold]{job.id}[/]  {job.model} ({job.type})  {_status(job.status)}")
        for label, value in (("progress", _progress_text(job.progress)), ("created", job.created_at),
                             ("started", job.started_at), ("completed", job.completed_at)):
            if value:
                console.print(f"  {label:<10}{value}")
        if job.error:
            console.print(f"  [red]error     {job.error.get('code')}: {job.error.get('message')}[/]")
        if job.output is not None:
            console.print_json(data=job.output)
    return _exit_code(job)


def cmd_jobs_watch(client, args) -> int:
    if args.json:
        for event in client.jobs.stream(args.job_id):
            print(json.dumps({"id": event.id, "type": event.type, "at": event.at, "data": event.data},
                             ensure_ascii=False), flush=True)
        return _exit_code(client.jobs.get(args.job_id))
    job, streamed = follow(client, client.jobs.get(args.job_id))
    return finish(job, args.output_dir, False, streamed)


def cmd_jobs_cancel(client, args) -> int:
    job = client.jobs.cancel(args.job_id)
    if args.json:
        _print_json(job.raw)
    else:
        print(f"{job.id} {'canceled' if job.status == 'canceled' else 'cancel requested (' + job.status + ')'}")
    return OK


def cmd_jobs_rm(client, args) -> int:
    for job_id in args.job_ids:
        client.jobs.delete(job_id)
        print(f"{job_id} deleted")
    return OK


def cmd_files_rm(client, args) -> int:
    for file_id in args.file_ids:
        client.files.delete(file_id)
        print(f"{file_id} deleted")
    return OK


def cmd_files_upload(client, args) -> int:
    f = client.files.upload(args.path, purpose=args.purpose)
    if args.json:
        _print_json(f.raw)
    else:
        print(f.id)
        print(f"# {f.filename}: {f.rows} rows, {f.bytes} bytes", file=sys.stderr)
    return OK


def _file_id(client, path_or_id: str) -> str:
    """An uploaded file's id: a path is uploaded first, anything else is taken as an id."""
    if not Path(path_or_id).exists():
        return path_or_id
    file_id = client.files.upload(path_or_id).id
    print(f"uploaded {path_or_id} as file {file_id}", file=sys.stderr)
    return file_id


def cmd_fine_tune_create(client, args) -> int:
    file_id = _file_id(client, args.file)
    validation = _file_id(client, args.validation_file) if args.validation_file else None
    hyper = {k: v for k, v in (("epochs", args.epochs), ("max_steps", args.max_steps),
                               ("learning_rate", args.learning_rate), ("batch_size", args.batch_size),
                               ("warmup_steps", args.warmup_steps), ("beta", args.beta)) if v is not None}
    job = client.fine_tunes.create(args.model, file_id, method=args.method, hyperparameters=hyper or None,
                                   suffix=args.suffix, validation_file=validation)
    if not args.watch:
        _print_json(job.raw) if args.json else print(job.id)
        return OK
    job, streamed = follow(client, job, quiet=args.json)
    return finish(job, None, args.json, streamed)


def cmd_keys_list(client, args) -> int:
    from genq.client import _core as core

    keys = client._json(core.Call("GET", "/v1/admin/keys", idempotent=True))["data"]
    if args.json:
        _print_json(keys)
        return OK
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in ("PREFIX", "TENANT", "ROLE", "CREATED", "REVOKED"):
        table.add_column(column)
    for k in keys:
        table.add_row(k["prefix"], k["tenant"], k["role"], (k["created_at"] or "")[:19], (k["revoked_at"] or "")[:19])
    Console().print(table)
    return OK


COMMANDS = {
    "run": cmd_run, "jobs ls": cmd_jobs_ls, "jobs get": cmd_jobs_get, "jobs watch": cmd_jobs_watch,
    "jobs cancel": cmd_jobs_cancel, "jobs rm": cmd_jobs_rm, "files upload": cmd_files_upload,
    "files rm": cmd_files_rm, "fine-tune create": cmd_fine_tune_create,
    "keys list": cmd_keys_list,
}


# --- following a job ---------------------------------------------------------

STATUS_STYLE = {"queued": "yellow", "running": "cyan", "succeeded": "green", "failed": "red", "canceled": "magenta"}


def _status(status: str) -> str:
    return f"[{STATUS_STYLE.get(status, 'white')}]{status}[/]"


def _progress_text(progress: dict | None) -> str:
    if not progress:
        return ""
    text = f"{progress.get('current')}/{progress.get('total')} {_plural(progress.get('unit', ''))}".strip()
    if "loss" in progress:
        text += f" loss {progress['loss']:.4f}"
    return text


# C0 and C1 control characters but newline and tab: a model's output may hold
# escape sequences, which a terminal would obey (move the cursor, retitle the window).
CONTROL = {c: "\ufffd" for c in [*range(0x00, 0x09), *range(0x0b, 0x20), 0x7f, *range(0x80, 0xa0)]}


def _for_terminal(text: str) -> str:
    """Model output as a terminal should show it; written unchanged to a pipe or a file."""
    return text.translate(CONTROL) if sys.stdout.isatty() else text


def _plural(unit: str) -> str:
    return f"{unit}s" if unit and not unit.endswith("s") else unit


def follow(client, job, quiet: bool = False):
    """Follow `job` on its event stream to its end, drawing a bar on stderr
    (steps, tokens; step and loss for a fine-tune) and writing a text job's
    output to stdout as it streams. Returns the job as it ended, and
    whether its text was written already."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if job.done:
        return job, False
    console = Console(stderr=True)
    text = job.type == "text-generation"
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[unit]}"),
                   TextColumn("{task.fields[extra]}"), TimeElapsedColumn(), console=console, transient=text,
                   disable=quiet or not console.is_terminal)  # a bar is for a person: none in a pipe or a log
    task = bar.add_task(f"{job.id[:8]} {_status(job.status)}", total=None, unit="", extra="")
    written: list[str] = []

    def show(progress: dict) -> None:
        extra = f"loss {progress['loss']:.4f}" if isinstance(progress.get("loss"), (int, float)) else ""
        bar.update(task, completed=progress.get("current", 0), total=progress.get("total"),
                   unit=_plural(progress.get("unit", "")), extra=extra)

    with bar:
        for event in client.jobs.stream(job.id):
            if event.delta is not None:
                if not written and not quiet:
                    bar.stop()  # from here the text itself shows progress
                written.append(event.delta)
                if not quiet:
                    sys.stdout.write(_for_terminal(event.delta))
                    sys.stdout.flush()
            elif event.type == "start":
                bar.update(task, description=f"{job.id[:8]} {_status('running')}")
            elif event.type == "progress" and isinstance(event.data, dict):
                show(event.data)
            elif event.type == "queue" and isinstance(event.data, dict):
                # Its place in line while it waits: jobs ahead, and when it should start.
                ahead, eta = event.data.get("position", 0), event.data.get("eta_seconds")
                more = "+" if event.data.get("position_is_lower_bound") else ""
                bar.update(task, description=f"{job.id[:8]} {_status('queued')} {ahead}{more} ahead"
                                             + (f", ~{eta:.0f}s" if eta is not None else ""))
        # The record's last progress: a job quicker than the progress interval streamed none.
        job = client.jobs.get(job.id)
        if job.progress:
            show(job.progress)
        bar.update(task, description=f"{job.id[:8]} {_status(job.status)}")
    if text and not quiet and written:
        final = (job.output or {}).get("text", "")
        streamed = "".join(written)
        # Live output is best-effort: what the stream missed, the record has.
        sys.stdout.write(_for_terminal(final[len(streamed):] if final.startswith(streamed) else "\n" + final))
        sys.stdout.write("\n")
    return job, bool(text and not quiet and written)


def finish(job, output_dir: str | None, as_json: bool, streamed: bool = False) -> int:
    """Say how the job ended: its output (text, files saved in `output_dir`
    or else their URLs, the new model) or its error. Returns the exit code."""
    if as_json:
        _print_json(job.raw)
    elif job.status != "succeeded":
        error = job.error or {}
        print(f"job {job.id} {job.status}" + (f": {error.get('code')}: {error.get('message')}" if error else ""),
              file=sys.stderr)
    elif job.type == "text-generation":
        if not streamed:
            print(_for_terminal((job.output or {}).get("text", "")))
    elif job.type == "image-generation":
        from genq.client import _core as core

        for line in job.download(output_dir) if output_dir else core.links(job.output):
            print(line)
    elif job.type == "fine-tune":
        print((job.output or {}).get("model", ""))
    else:
        _print_json(job.output)
    return _exit_code(job)
