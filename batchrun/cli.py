"""The command line: options → settings, results → text, errors → one line + exit code."""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from . import commands
from .errors import EXIT_INTERRUPTED, EXIT_OK, BatchrunError, ManifestError
from .events import JsonLinesRenderer, LiveRenderer, PlainRenderer
from .logsetup import configure, redact
from .manifest import schema_text
from .outcome import ApplyResult, nothing_to_do
from .plan import plan_to_json
from .report import apply_text, plan_text, status_rows, status_text

if TYPE_CHECKING:
    from .engine import Engine
    from .state import StateStore

F = TypeVar("F", bound=Callable[..., Any])


def _die(exc: BaseException) -> NoReturn:
    if os.environ.get("BATCHRUN_DEBUG") == "1":
        traceback.print_exc()
    if isinstance(exc, ManifestError):
        for problem in exc.problems:
            click.echo(problem, err=True)
        n = len(exc.problems)
        click.echo(f"{n} problem{'s' if n != 1 else ''} in the manifest.", err=True)
        sys.exit(exc.exit_code)
    if isinstance(exc, BatchrunError):
        click.echo(f"batchrun: {redact(exc.message)}", err=True)
        sys.exit(exc.exit_code)
    click.echo(
        f"batchrun: internal error: {type(exc).__name__}: {redact(str(exc))}"
        " (set BATCHRUN_DEBUG=1 for a traceback, and please report it)",
        err=True,
    )
    sys.exit(1)


class Group(click.Group):
    """Turns every error into one line and an exit code, in one place."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except KeyboardInterrupt:
            click.echo("batchrun: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except Exception as exc:
            _die(exc)


def _json_text(obj: object) -> str:
    """Indented for a person at a terminal; one line for a program (indent
    forces json's pure-Python encoder: 0.3 s for a 10,000-run plan)."""
    return json.dumps(obj, indent=2 if sys.stdout.isatty() else None)


def manifest_arg(f: F) -> F:
    return click.argument(
        "manifest", type=click.Path(path_type=Path, dir_okay=False, exists=False)
    )(f)


def state_opt(f: F) -> F:
    return click.option(
        "--state",
        "state_path",
        type=click.Path(path_type=Path, dir_okay=False),
        help="State file (default: <manifest>.batchrun-state.db beside the manifest).",
    )(f)


def root_opt(f: F) -> F:
    return click.option(
        "--output-root",
        type=click.Path(path_type=Path, file_okay=False),
        help="Folder outputs must stay inside (default: the manifest's folder).",
    )(f)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="batchrun")
@click.option(
    "--log-level",
    default=lambda: os.environ.get("BATCHRUN_LOG", "warning"),
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    help="Log level for diagnostics on stderr (env BATCHRUN_LOG).",
)
def main(log_level: str) -> None:
    """Apply a YAML manifest of optimization runs to Nextmv Cloud."""
    configure(log_level)


@main.command()
@manifest_arg
@root_opt
def validate(manifest: Path, output_root: Path | None) -> None:
    """Check a manifest: schema, files, names, outputs. Exit 2 on any problem."""
    m = commands.validate(manifest, commands.Overrides(output_root=output_root))
    click.echo(f"{manifest}: valid ({len(m.runs)} runs)")


@main.command()
@manifest_arg
@state_opt
@root_opt
@click.option("--json", "as_json", is_flag=True, help="Print the plan as a JSON object.")
@click.option(
    "--detailed-exitcode",
    is_flag=True,
    help="Exit 0 when there is nothing to do, 2 when work is pending, 1 on error.",
)
def plan(
    manifest: Path,
    state_path: Path | None,
    output_root: Path | None,
    as_json: bool,
    detailed_exitcode: bool,
) -> None:
    """Show what apply would do, without touching the service."""
    o = commands.Overrides(state_path=state_path, output_root=output_root)
    try:
        planned = commands.plan(manifest, o)
    except BatchrunError as exc:
        if detailed_exitcode:
            if isinstance(exc, ManifestError):
                for problem in exc.problems:
                    click.echo(problem, err=True)
            else:
                click.echo(f"batchrun: {exc.message}", err=True)
            sys.exit(1)
        raise
    if as_json:
        click.echo(_json_text(plan_to_json(planned.plan)))
    else:
        click.echo(plan_text(planned.plan))
    if detailed_exitcode:
        sys.exit(2 if planned.plan.summary.pending else 0)


@main.command()
@manifest_arg
@state_opt
@root_opt
@click.option("--endpoint", help="Override the manifest's endpoint (a URL, or 'embedded').")
@click.option("--concurrency", type=click.IntRange(min=1), help="Runs in flight on the service.")
@click.option("--transfers", type=click.IntRange(min=1), help="Uploads and downloads at once.")
@click.option("--runs-per-second", type=click.FloatRange(min=0, min_open=True))
@click.option("--results-per-10s", type=click.FloatRange(min=0, min_open=True))
@click.option("--fail-fast", is_flag=True, help="Start no new run after the first failure.")
@click.option("--json", "as_json", is_flag=True, help="Events as JSON lines on stdout.")
@click.option("--plain", is_flag=True, help="One line per transition even on a terminal.")
def apply(
    manifest: Path,
    state_path: Path | None,
    output_root: Path | None,
    endpoint: str | None,
    concurrency: int | None,
    transfers: int | None,
    runs_per_second: float | None,
    results_per_10s: float | None,
    fail_fast: bool,
    as_json: bool,
    plain: bool,
) -> None:
    """Run what the plan says, recording every step so it can resume."""
    o = commands.Overrides(
        state_path=state_path,
        endpoint=endpoint,
        concurrency=concurrency,
        transfers=transfers,
        runs_per_second=runs_per_second,
        results_per_10s=results_per_10s,
        output_root=output_root,
    )
    m = commands.validate(manifest, o)
    renderer: JsonLinesRenderer | PlainRenderer | LiveRenderer
    if as_json:
        renderer = JsonLinesRenderer()
    elif plain or not sys.stderr.isatty():
        renderer = PlainRenderer()
    else:
        renderer = LiveRenderer()
    try:
        with commands.locked_plan(m, o) as (planned, store):
            if planned.plan.summary.pending:
                result = _run_interruptible(planned, store, fail_fast, renderer)
            else:
                result = nothing_to_do(planned.plan, renderer)  # no asyncio, no HTTP
    finally:
        renderer.close()
    if result is None:
        click.echo("Interrupted before any run started; nothing changed.", err=True)
        sys.exit(EXIT_INTERRUPTED)
    if not as_json:
        click.echo(apply_text(result))
    if result.interrupted:
        sys.exit(EXIT_INTERRUPTED)
    if result.fatal:
        sys.exit(result.fatal_exit_code)
    sys.exit(EXIT_OK if result.ok else 1)


def _run_interruptible(
    planned: commands.Planned,
    store: StateStore,
    fail_fast: bool,
    emit: Callable[..., None],
) -> ApplyResult | None:
    """First SIGINT/SIGTERM: the engine stops starting work and saves state.
    A second one exits at once: every committed transition is already durable."""
    import asyncio

    async def go() -> ApplyResult | None:
        loop = asyncio.get_running_loop()
        main_task = asyncio.current_task()
        holder: dict[str, Engine] = {}
        signals = {"count": 0}

        def on_signal() -> None:
            signals["count"] += 1
            if signals["count"] > 1:
                os._exit(EXIT_INTERRUPTED)
            engine = holder.get("engine")
            if engine is not None:
                engine.interrupt()
            elif main_task is not None:
                main_task.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        try:
            return await commands.execute(
                planned,
                store,
                fail_fast=fail_fast,
                emit=emit,
                on_engine=lambda e: holder.__setitem__("engine", e),
            )
        except asyncio.CancelledError:
            return None

    return asyncio.run(go())


@main.command()
@manifest_arg
@state_opt
@click.option("--json", "as_json", is_flag=True)
def status(manifest: Path, state_path: Path | None, as_json: bool) -> None:
    """What the state file says about each run (no network)."""
    m, records = commands.status(manifest, commands.Overrides(state_path=state_path))
    rows = status_rows(m, records)
    if as_json:
        click.echo(_json_text({"runs": rows}))
    else:
        click.echo(status_text(rows))


@main.command()
@manifest_arg
@state_opt
@click.option("--endpoint", help="Override the manifest's endpoint.")
def cancel(manifest: Path, state_path: Path | None, endpoint: str | None) -> None:
    """Cancel the runs this manifest has in flight on the service."""
    o = commands.Overrides(state_path=state_path, endpoint=endpoint)
    m = commands.validate(manifest, o)
    import asyncio

    canceled = asyncio.run(commands.cancel_async(m, o, PlainRenderer()))
    for name, run_id in canceled:
        click.echo(f"canceled {name}: {run_id}")
    click.echo(f"{len(canceled)} run(s) canceled.")


@main.command()
@manifest_arg
@state_opt
def unlock(manifest: Path, state_path: Path | None) -> None:
    """Remove a lock left behind (refused while its holder is alive)."""
    from .state import default_state_path, force_unlock

    path = state_path or default_state_path(manifest.resolve())
    removed = force_unlock(path)
    click.echo(f"removed lock: {removed}" if removed else "no lock to remove")


@main.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.pass_context
def emulator(ctx: click.Context) -> None:
    """Serve the Nextmv-compatible emulator (--help for its options).

    batchrun emulator --port 8080 --api-key KEY --app knapsack=examples/knapsack
    """
    from .emulator.__main__ import main as emulator_main

    sys.exit(emulator_main(list(ctx.args), prog="batchrun emulator", human=True))


@main.command()
def schema() -> None:
    """Print the manifest's JSON Schema."""
    click.echo(schema_text(), nl=False)


if __name__ == "__main__":  # pragma: no cover
    main()
