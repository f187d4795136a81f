"""Command line: ltframe run | resume | eval | show | plugins | components."""

from __future__ import annotations

import sys
import time
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ltframe.config import params_help
from ltframe.engine.report import Reporter
from ltframe.errors import LtframeError

console = Console(stderr=True)
out = Console()


class RichReporter(Reporter):
    """Progress bar with loss, lr, images/s and ETA; evaluation lines."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.bar: Progress | None = None
        self.task: Any = None

    def message(self, text: str) -> None:
        if not self.quiet:
            console.print(f"[dim]{text}[/dim]")

    def stage_start(self, name: str, total_steps: int, start_step: int) -> None:
        if self.quiet:
            return
        self.bar = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), console=console, transient=False,
        )
        self.bar.start()
        self.task = self.bar.add_task(name, total=total_steps, completed=start_step, info="")

    def progress(self, step: int, info: dict[str, Any]) -> None:
        if self.bar is not None:
            text = (f"loss {info['total']:.4f} lr {info['lr']:.3g} "
                    f"{info['images_per_s']:.0f} img/s")
            self.bar.update(self.task, completed=step, info=text)

    def evaluation(self, stage: str, epoch: int, metrics: dict[str, Any]) -> None:
        if not self.quiet:
            console.print(f"  {stage} epoch {epoch + 1}: top1 {metrics['top1']:.2f} "
                          f"many {_fmt(metrics.get('many'))} medium {_fmt(metrics.get('medium'))} "
                          f"few {_fmt(metrics.get('few'))}")

    def stage_end(self, name: str) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}"


def results_table(summary: dict[str, Any], title: str = "results") -> Table:
    table = Table(title=title)
    for col in ("overall", "many", "medium", "few"):
        table.add_column(col, justify="right")
    table.add_row(_fmt(summary.get("top1")), _fmt(summary.get("many")),
                  _fmt(summary.get("medium")), _fmt(summary.get("few")))
    return table


def _fail(exc: BaseException) -> None:
    console.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
    sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ltframe")
def main() -> None:
    """ltframe: long-tailed and semi-supervised long-tailed recognition from TOML recipes."""


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value, e.g. --set optim.lr=0.01 (repeatable).")
@click.option("--out", "out_dir", default=None, help="Parent folder for the run directory.")
@click.option("--smoke", is_flag=True, help="Every stage for 2 steps on a small data slice.")
@click.option("--block", multiple=True, metavar="PLUGIN", help="Do not load this plugin.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output; print the table only.")
def run(recipe: str, overrides: tuple[str, ...], out_dir: str | None, smoke: bool,
        block: tuple[str, ...], quiet: bool) -> None:
    """Train and evaluate as RECIPE says; writes a run directory."""
    from ltframe.engine.run import start_run

    t0 = time.perf_counter()
    try:
        summary = start_run(recipe, list(overrides), out_dir=out_dir, smoke=smoke,
                            block=list(block), reporter=RichReporter(quiet))
    except (LtframeError, KeyboardInterrupt) as exc:
        _fail(exc if str(exc) else RuntimeError("interrupted"))
    _finish(summary, time.perf_counter() - t0)


def _finish(summary: dict[str, Any], seconds: float) -> None:
    ips = summary.get("images_per_s")
    speed = f", {ips:.0f} images/s" if ips else ""
    out.print(f"{summary['run_dir']}  ({seconds:.0f} s{speed})", highlight=False)
    out.print(results_table(summary, "balanced test set, top-1 %"))


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Change a value before continuing (e.g. a lower optim.lr after a NaN).")
@click.option("--quiet", "-q", is_flag=True)
def resume(run_dir: str, overrides: tuple[str, ...], quiet: bool) -> None:
    """Continue RUN_DIR from its latest checkpoint."""
    from ltframe.engine.run import resume_run

    t0 = time.perf_counter()
    try:
        summary = resume_run(run_dir, list(overrides), reporter=RichReporter(quiet))
    except (LtframeError, KeyboardInterrupt) as exc:
        _fail(exc)
    _finish(summary, time.perf_counter() - t0)


@main.command(name="eval")
@click.argument("target", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def eval_cmd(target: str, as_json: bool) -> None:
    """Evaluate a run directory (latest checkpoint) or a checkpoint file on the test set."""
    import json

    from ltframe.engine.run import evaluate_checkpoint

    try:
        metrics = evaluate_checkpoint(target)
    except LtframeError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(metrics))
    else:
        out.print(metrics["checkpoint"], highlight=False)
        out.print(results_table(metrics, "balanced test set, top-1 %"))


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
@click.option("--block", multiple=True, metavar="PLUGIN")
def show(recipe: str, overrides: tuple[str, ...], block: tuple[str, ...]) -> None:
    """Print the fully resolved RECIPE (defaults filled in, extends and --set applied)."""
    from ltframe.plugins import make_plugin_manager
    from ltframe.recipe import load_recipe

    try:
        _, registry = make_plugin_manager(block)
        click.echo(load_recipe(recipe, registry, list(overrides)).to_toml(), nl=False)
    except LtframeError as exc:
        _fail(exc)


@main.command()
@click.option("--block", multiple=True, metavar="PLUGIN")
def plugins(block: tuple[str, ...]) -> None:
    """List installed plugins with their versions."""
    from ltframe.plugins import list_plugins, make_plugin_manager

    try:
        pm, _ = make_plugin_manager(block)
    except LtframeError as exc:
        _fail(exc)
    table = Table(title="ltframe plugins")
    for col in ("plugin", "module", "distribution", "version"):
        table.add_column(col)
    for p in list_plugins(pm):
        table.add_row(p.name, p.module, p.distribution, p.version)
    out.print(table)
    if block:
        out.print(f"blocked: {', '.join(block)}")


@main.command()
@click.argument("kind", required=False)
@click.option("--block", multiple=True, metavar="PLUGIN")
def components(kind: str | None, block: tuple[str, ...]) -> None:
    """List registered components (of KIND), their plugin and parameters with defaults."""
    from ltframe.plugins import make_plugin_manager

    try:
        _, registry = make_plugin_manager(block)
        entries = registry.entries(kind)
    except LtframeError as exc:
        _fail(exc)
    table = Table(title=f"ltframe components{f' ({kind})' if kind else ''}")
    for col in ("kind", "name", "plugin", "parameters (default)", "description"):
        table.add_column(col, overflow="fold")
    for e in entries:
        params = ", ".join(f"{n}={d}" for n, _, d in params_help(e.params)) or "-"
        table.add_row(e.kind, e.name, e.plugin, params, e.doc)
    out.print(table)


if __name__ == "__main__":  # pragma: no cover
    main()
