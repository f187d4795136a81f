"""Command line: ltframe run | resume | eval | export | show | plugins | components.

Start-up stays light: only click and rich are imported at module level; the engine (torch,
timm, torchvision) is imported inside the commands that need it, so `ltframe --help` answers
at once. Every error ends in one `error: ...` line; `ltframe --debug ...` shows tracebacks.
"""

from __future__ import annotations

import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ltframe.engine.report import Reporter
from ltframe.errors import LtframeError

console = Console(stderr=True)
out = Console()

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C


class RichReporter(Reporter):
    """Progress bar per stage (its name carries the generation / loop, e.g. gen2, ft3) with
    loss, lr, images/s, ETA and the latest evaluation's overall/many/medium/few; one line per
    evaluation."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.bar: Any = None
        self.task: Any = None
        self.latest = ""  # the last evaluation, shown in the bar until the next one
        self.info = ""

    def message(self, text: str) -> None:
        if not self.quiet:
            console.print(f"[dim]{escape(text)}[/dim]")

    def stage_start(self, name: str, total_steps: int, start_step: int) -> None:
        if self.quiet:
            return
        from rich.progress import (
            BarColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

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
            self.info = (f"loss {info['total']:.4f} lr {info['lr']:.3g} "
                         f"{info['images_per_s']:.0f} img/s")
            self.bar.update(self.task, completed=step, info=self._info())

    def _info(self) -> str:
        return f"{self.info} | {self.latest}" if self.latest else self.info

    def evaluation(self, stage: str, epoch: int, metrics: dict[str, Any]) -> None:
        groups = (f"top1 {metrics['top1']:.2f} many {_fmt(metrics.get('many'))} "
                  f"medium {_fmt(metrics.get('medium'))} few {_fmt(metrics.get('few'))}")
        self.latest = f"{stage} ep {epoch + 1}: {groups}"
        if self.bar is not None:
            self.bar.update(self.task, info=self._info())
        if not self.quiet:
            console.print(f"  {stage} epoch {epoch + 1}: {groups}", highlight=False)

    def stage_end(self, name: str) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}"


def _metric_cells(m: dict[str, Any]) -> list[str]:
    return [_fmt(m.get("top1")), _fmt(m.get("many")), _fmt(m.get("medium")), _fmt(m.get("few"))]


def _report_label(summary: dict[str, Any]) -> str:
    report = summary.get("report")
    if report == "mean_last_k" and summary.get("evaluations"):
        return f"mean of the last {summary['evaluations']} evaluations"
    return f"{report} evaluation"


def results_table(summary: dict[str, Any], title: str = "results") -> Table:
    """One row of overall/many/medium/few top-1; one row per post-hoc tau when the summary has
    `rows`; the title names the `report` ("best evaluation") and, when the reported number is
    not the last evaluation, rows labelled "last" show the last evaluation beside it."""
    report = summary.get("report")
    if report:
        title = f"{title} ({_report_label(summary)})"
    last = summary.get("last") if report and report != "last" else None
    blocks: list[tuple[str, dict[str, Any]]] = [(str(report or ""), summary)]
    if last:
        blocks.append(("last", last))
    per_tau = any(m.get("rows") for _, m in blocks)
    table = Table(title=title, min_width=len(title) + 2)  # the title stays on one line
    if last:
        table.add_column("")
    if per_tau:
        table.add_column("tau", justify="right")
    for col in ("overall", "many", "medium", "few"):
        table.add_column(col, justify="right")
    for label, metrics in blocks:
        rows = metrics.get("rows")
        lines = ([(f"{r['posthoc_tau']:g}", r) for r in rows] if rows
                 else [(_fmt_tau(metrics.get("posthoc_tau")), metrics)])
        for tau, m in lines:
            cells = ([label] if last else []) + ([tau] if per_tau else []) + _metric_cells(m)
            table.add_row(*cells)
    return table


def _fmt_tau(tau: Any) -> str:
    return "-" if tau is None else f"{tau:g}"


# --- errors -------------------------------------------------------------------------------


def _error_line(message: str, code: int) -> None:
    """Print `error: message` on one line (stderr) and exit with `code`."""
    one_line = " ".join(str(message).split())
    console.print(f"[bold red]error:[/bold red] {escape(one_line)}", highlight=False,
                  soft_wrap=True)
    sys.exit(code)


def _traceback_file(exc: BaseException) -> Path:
    """The file holding `exc`'s traceback: the run's error.log the engine attached, or a new
    temporary file."""
    log = getattr(exc, "ltframe_log", None)
    if log is not None and Path(log).is_file():
        return Path(log)
    with tempfile.NamedTemporaryFile("w", prefix="ltframe-error-", suffix=".log",
                                     delete=False) as fh:
        fh.write(f"ltframe {' '.join(sys.argv[1:])}\n")
        fh.write("".join(traceback.format_exception(exc)))
    return Path(fh.name)


def handle_error(exc: BaseException, debug: bool) -> None:
    """Turn an exception escaping a command into output and an exit code (never returns)."""
    if isinstance(exc, LtframeError):
        if debug:
            traceback.print_exception(exc, file=sys.stderr)
        from ltframe.errors import RunInterrupted

        _error_line(str(exc) or type(exc).__name__,
                    EXIT_INTERRUPTED if isinstance(exc, RunInterrupted) else 1)
    if isinstance(exc, KeyboardInterrupt):
        if debug:
            traceback.print_exception(exc, file=sys.stderr)
        _error_line("interrupted", EXIT_INTERRUPTED)
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
        sys.exit(1)
    text = " ".join(str(exc).split())
    what = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    try:
        where = f"traceback in {_traceback_file(exc)}"
    except OSError as write_exc:  # not even a temp file: say so, keep the one line
        where = f"traceback not saved: {write_exc}"
    _error_line(f"internal error: {what} ({where}; run with --debug to see it)", 1)


class LtframeGroup(click.Group):
    """click group that turns every exception escaping a command into one `error:` line."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort,
                SystemExit):
            raise  # click's own usage errors and exits keep their behaviour
        except (Exception, KeyboardInterrupt) as exc:
            handle_error(exc, bool(ctx.params.get("debug")))


# --- argument checks ----------------------------------------------------------------------


def check_block(block: tuple[str, ...] | list[str]) -> list[str]:
    """`--block NAME` must name an installed plugin (checked before anything heavy loads)."""
    from ltframe.plugins import check_block as check

    return check(block)


# --- commands -----------------------------------------------------------------------------


@click.group(cls=LtframeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ltframe")
@click.option("--debug", is_flag=True,
              help="Show the full traceback of an error instead of the one-line message.")
def main(debug: bool) -> None:
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
    blocked = check_block(block)
    from ltframe.engine.run import start_run

    t0 = time.perf_counter()
    try:
        summary = start_run(recipe, list(overrides), out_dir=out_dir, smoke=smoke,
                            block=blocked, reporter=_reporter(quiet))
    finally:
        _leave_group()
    _finish(summary, time.perf_counter() - t0)


def _reporter(quiet: bool) -> Reporter:
    """Progress on the terminal from rank 0 only (under torchrun)."""
    from ltframe.engine.dist import env_info

    return RichReporter(quiet) if env_info().main else Reporter()


def _leave_group() -> None:
    from ltframe.engine.dist import shutdown

    shutdown()


def _finish(summary: dict[str, Any], seconds: float) -> None:
    from ltframe.engine.dist import env_info

    if not env_info().main:
        return
    ips = summary.get("images_per_s")
    speed = f", {ips:.0f} images/s" if ips else ""
    out.print(f"{summary['run_dir']}  ({seconds:.0f} s{speed})", highlight=False)
    out.print(results_table(summary, "balanced test set, top-1 %"))


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Change a value before continuing (e.g. a lower optim.lr after a NaN).")
@click.option("--from", "from_checkpoint", default=None, metavar="CHECKPOINT",
              help="Continue from this checkpoint of RUN_DIR instead of the newest valid one.")
@click.option("--accept-edited-recipe", is_flag=True,
              help="Continue although RUN_DIR/resolved.toml was edited by hand (recorded in "
                   "run.json); prefer --set.")
@click.option("--quiet", "-q", is_flag=True)
def resume(run_dir: str, overrides: tuple[str, ...], from_checkpoint: str | None,
           accept_edited_recipe: bool, quiet: bool) -> None:
    """Continue RUN_DIR from its latest checkpoint (or --from CHECKPOINT). Only one process
    writes a run: a resume of a run still training is refused."""
    from ltframe.engine.run import resume_run

    t0 = time.perf_counter()
    try:
        summary = resume_run(run_dir, list(overrides), from_checkpoint=from_checkpoint,
                             reporter=_reporter(quiet),
                             **({"accept_edited_recipe": True} if accept_edited_recipe else {}))
    finally:
        _leave_group()
    _finish(summary, time.perf_counter() - t0)


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--stages", is_flag=True, help="One row per stage of each run.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def compare(run_dirs: tuple[str, ...], stages: bool, as_json: bool) -> None:
    """Finished runs side by side: overall / many / medium / few top-1 (balanced test set)."""
    import json

    from ltframe.compare import compare_rows
    from ltframe.engine.runlock import holder

    for d in run_dirs:  # a run still training has no final numbers: never advise resuming it
        pid = holder(Path(d)) if Path(d).is_dir() else None
        if pid is not None:
            raise LtframeError(f"{d}: still training (process {pid} holds its lock); wait for "
                               "it to finish, then compare")
    rows = compare_rows(list(run_dirs), stages)
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table(title="balanced test set, top-1 %")
    taus = any(r.get("posthoc_tau") is not None for r in rows)  # one row per post-hoc tau
    cols = ["run", *(["stage", "head"] if stages else []), "report", *(["tau"] if taus else []),
            "overall", "many", "medium", "few", "last"]
    for c in cols:
        table.add_column(c, no_wrap=True,
                         justify="left" if c in ("run", "stage", "head", "report") else "right")
    for r in rows:
        names = [r["run"], *([r["stage"], str(r.get("eval_head") or "")] if stages else [])]
        tau = [_fmt_tau(r.get("posthoc_tau"))] if taus else []
        table.add_row(*names, r["protocol"], *tau, *(_fmt(r[m]) for m in ("top1", "many",
                                                                           "medium", "few")),
                      _fmt(r["last_top1"]))
    out.print(table)


@main.command()
@click.argument("run_dir", type=click.Path())
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--top-k", "-k", default=5, show_default=True, help="Classes shown per image.")
@click.option("--json", "as_json", is_flag=True, help="Print the predictions as JSON.")
def predict(run_dir: str, images: tuple[str, ...], top_k: int, as_json: bool) -> None:
    """Classify IMAGES (files or folders) with the finished run RUN_DIR: its evaluation head
    and the post-hoc adjustment it was evaluated with."""
    import json

    from ltframe.predict import predict_files

    rows = predict_files(run_dir, list(images), top_k)
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table(title=f"top-{min(top_k, len(rows[0]['top']))} predictions")
    table.add_column("image", overflow="fold")
    table.add_column("classes (probability)")
    for r in rows:
        table.add_row(r["file"], ", ".join(f"{t['class']} ({t['prob']:.3f})" for t in r["top"]))
    out.print(table)


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--out", "out_dir", default="report", show_default=True,
              help="Folder for report.md and its PNG figures.")
def report(run_dirs: tuple[str, ...], out_dir: str) -> None:
    """A Markdown report with figures for finished runs (matplotlib: the `plots` extra)."""
    from ltframe.report import write_report

    path = write_report(list(run_dirs), out_dir)
    out.print(f"{path}", highlight=False)


@main.command(name="eval")
@click.argument("target", type=click.Path())
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Change an [eval] value, e.g. --set eval.posthoc_tau=[0,1] (repeatable).")
@click.option("--data", "data", default=None, metavar="FOLDER",
              help="Evaluate the finished run TARGET on FOLDER/<class>/<images> instead "
                   "(classes matched by name to the run's).")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def eval_cmd(target: str, overrides: tuple[str, ...], data: str | None, as_json: bool) -> None:
    """Evaluate a run directory (latest checkpoint) or a checkpoint file on the test set, or
    a finished run on another labelled folder (--data)."""
    import json

    if data is not None:
        from ltframe.predict import evaluate_folder

        metrics = evaluate_folder(target, data, list(overrides))
        title = f"{data} ({metrics['images']} images), top-1 %"
    else:
        from ltframe.engine.run import evaluate_checkpoint

        metrics = evaluate_checkpoint(target, list(overrides))
        title = "balanced test set, top-1 %"
    if as_json:
        click.echo(json.dumps(metrics))
    else:
        out.print(metrics["checkpoint"], highlight=False)
        out.print(results_table(metrics, title))


@main.command()
@click.argument("run_dir", type=click.Path())
@click.option("--out", "out_file", required=True, metavar="FILE",
              help="Writes FILE.safetensors and FILE.json.")
@click.option("--tau", type=float, default=None,
              help="Post-hoc adjustment folded in (default: the run's first eval.posthoc_tau).")
@click.option("--format", "fmt", type=click.Choice(["auto", "timm", "ltframe"]), default="auto",
              show_default=True, help="timm: a plain timm model (heads linear in the features); "
                                      "ltframe: keep the ltframe head.")
def export(run_dir: str, out_file: str, tau: float | None, fmt: str) -> None:
    """Export the finished run RUN_DIR's model: safetensors + JSON (classes, input size,
    mean/std, training prior, tau), loadable with timm or ltframe.load_model."""
    from ltframe.export import export_run

    meta = export_run(run_dir, out_file, tau, fmt)
    for f in meta["files"]:
        out.print(f, highlight=False)
    if meta["format"] == "timm":
        kw = dict(meta["timm"])
        name = kw.pop("model_name")
        args = ", ".join(f"{k}={v!r}" for k, v in kw.items())
        out.print(f"timm.create_model({name!r}, {args})", highlight=False, soft_wrap=True)
    else:
        out.print(f"ltframe.load_model({meta['files'][0]!r})  ({meta['reason']})",
                  highlight=False, soft_wrap=True)


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
@click.option("--block", multiple=True, metavar="PLUGIN")
def show(recipe: str, overrides: tuple[str, ...], block: tuple[str, ...]) -> None:
    """Print the fully resolved RECIPE (defaults filled in, extends and --set applied)."""
    from ltframe.plugins import make_plugin_manager
    from ltframe.recipe import load_recipe

    _, registry = make_plugin_manager(check_block(block))
    click.echo(load_recipe(recipe, registry, list(overrides)).to_toml(), nl=False)


@main.command()
@click.option("--block", multiple=True, metavar="PLUGIN")
def plugins(block: tuple[str, ...]) -> None:
    """List installed plugins with their versions."""
    from ltframe.plugins import list_plugins, make_plugin_manager

    pm, _ = make_plugin_manager(check_block(block))
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
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the components as JSON.")
@click.option("--block", multiple=True, metavar="PLUGIN")
def components(kind: str | None, name: str | None, as_json: bool, block: tuple[str, ...]) -> None:
    """List registered components (of KIND), their plugin and parameters with defaults;
    KIND NAME shows what each parameter means, its range and default, and the aliases."""
    import json

    from ltframe.config import params_help
    from ltframe.paramdoc import aliases, describe
    from ltframe.plugins import make_plugin_manager

    _, registry = make_plugin_manager(check_block(block))
    if name is not None:
        info = describe(registry, registry.get(kind or "", name))
        if as_json:
            click.echo(json.dumps(info, indent=2))
        else:
            _component_detail(info)
        return
    entries = registry.entries(kind)
    if as_json:
        click.echo(json.dumps([describe(registry, e) for e in entries], indent=2))
        return
    rows = []
    for e in entries:
        also = aliases(registry, e)
        params = ", ".join(f"{n}={d}" for n, _, d in params_help(e.params)) or "-"
        rows.append((e.kind, e.name + (f" ({', '.join(also)})" if also else ""), e.plugin, params,
                     e.doc))
    if not out.is_terminal:  # piped: one full line per component, nothing cut or folded
        _plain_rows(("kind", "name", "plugin", "parameters (default)", "description"), rows)
        return
    table = Table(title=f"ltframe components{f' ({kind})' if kind else ''}")
    for col in ("kind", "name", "plugin"):
        table.add_column(col, no_wrap=True)
    for col in ("parameters (default)", "description"):
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*(escape(c) for c in row))
    out.print(table)


def _plain_rows(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """Aligned columns (all but the last padded), no wrapping, for pipes and files."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    for r in [header, *rows]:
        cells = [c.ljust(w) for c, w in zip(r, widths, strict=False)] + [r[-1]]
        click.echo("  ".join(cells).rstrip())


def _component_detail(info: dict[str, Any]) -> None:
    """`ltframe components KIND NAME`: the component and what each parameter means."""
    also = f" (aliases: {', '.join(info['aliases'])})" if info["aliases"] else ""
    click.echo(f"{info['kind']} {info['name']}{also}, plugin {info['plugin']}")
    if info["description"]:
        click.echo(info["description"])
    if not info["params"]:
        click.echo("no parameters")
        return
    rows = [(p["name"], p["type"], "(required)" if p["required"] else repr(p["default"]),
             p["range"] or "-", p["help"] or "-") for p in info["params"]]
    header = ("parameter", "type", "default", "range", "meaning")
    if not out.is_terminal:
        _plain_rows(header, rows)
        return
    table = Table()
    for col in header[:-1]:
        table.add_column(col, no_wrap=col == "parameter", overflow="fold")
    table.add_column(header[-1], overflow="fold", ratio=1)
    for row in rows:
        table.add_row(*(escape(c) for c in row))
    out.print(table)


if __name__ == "__main__":  # pragma: no cover
    main()
