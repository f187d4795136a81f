"""The README's recipe gallery, generated from run directories (issue 11), never typed.

    .venv/bin/python benchmarks/gallery.py collect RUN_DIR ...   # rows -> benchmarks/gallery.json
    .venv/bin/python benchmarks/gallery.py render                # gallery.json -> README block

`collect` reads each finished run's run.json (recipe, --set overrides) and summary.json (the
reported number and its protocol) and replaces the row of that recipe. `render` writes the
table between the README's `<!-- gallery:start -->` and `<!-- gallery:end -->` markers, with
each recipe's method and paper number from benchmarks/gallery.toml.
"""

from __future__ import annotations

import argparse
import json
import shlex
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ROWS = ROOT / "benchmarks" / "gallery.json"
PAPERS = ROOT / "benchmarks" / "gallery.toml"
START, END = "<!-- gallery:start -->", "<!-- gallery:end -->"


def row_of(run_dir: Path) -> dict[str, Any]:
    meta = json.loads((run_dir / "run.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    recipe = meta.get("recipe") or ""
    command = " ".join(["ltframe run", shlex.quote(recipe),
                        *(f"--set {shlex.quote(o)}" for o in meta.get("overrides", []))])
    report = summary.get("report") or "last"
    if report == "mean_last_k":
        report = f"mean of last {summary.get('evaluations')}"
    return {"recipe": recipe, "command": command, "protocol": report,
            **{k: summary.get(k) for k in ("top1", "many", "medium", "few")},
            "seconds": summary.get("seconds")}


def collect(run_dirs: list[Path], rows_file: Path = ROWS) -> list[dict[str, Any]]:
    rows = json.loads(rows_file.read_text()) if rows_file.is_file() else []
    for d in run_dirs:
        new = row_of(d)
        rows = [r for r in rows if r["recipe"] != new["recipe"]] + [new]
    rows.sort(key=lambda r: r["recipe"])
    rows_file.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n")
    return rows


def _num(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}"


def render_block(rows: list[dict[str, Any]], papers: dict[str, Any]) -> str:
    lines = [START, "", "| recipe | method | paper | measured top-1 (many / medium / few) | "
             "protocol | paper's number (its setting) | command |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        p = papers.get(r["recipe"], {})
        paper_no = p.get("paper_number") or "-"
        lines.append(
            f"| `{r['recipe']}` | {p.get('method', '-')} | {p.get('paper', '-')} | "
            f"{_num(r['top1'])} ({_num(r['many'])} / {_num(r['medium'])} / {_num(r['few'])}) | "
            f"{r['protocol']} | {paper_no} ({p.get('paper_setting', '-')}) | "
            f"`{r['command']}` |")
    return "\n".join([*lines, "", END])


def render(readme: Path, rows_file: Path = ROWS, papers_file: Path = PAPERS) -> str:
    rows = json.loads(rows_file.read_text())
    papers = tomllib.loads(papers_file.read_text())
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme}: no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = head + render_block(rows, papers) + tail
    readme.write_text(new)
    return new


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect")
    c.add_argument("run_dirs", nargs="+", type=Path)
    r = sub.add_parser("render")
    r.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = ap.parse_args()
    if args.cmd == "collect":
        print(json.dumps(collect(args.run_dirs), indent=1, ensure_ascii=False))
    else:
        render(args.readme)


if __name__ == "__main__":
    main()
