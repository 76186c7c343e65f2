"""``python -m bench.charts``: SVG bar charts of saved benchmark runs.

Reads the raw figures that ``python -m bench`` saves (``bench/results/*.json``)
and draws one horizontal bar chart per scenario and measure: requests per
second, KB per held long poll, publish-to-last-answer time, upload speed.
asyncapp's rows are drawn in blue, the peers in grey, the spread of the runs
as a whisker when the run kept one. Standard library only, and the output
depends on the JSON alone (no timestamps, no random ids), so redrawing an
unchanged run changes no file.

``python -m bench`` draws the charts of each run it saves, next to its JSON;
the documentation build draws those of the committed runs into
``docs/_generated/charts`` (``docs/conf.py``), so it needs no benchmark run.

.. code-block:: sh

    python -m bench.charts                                # every bench/results/*.json
    python -m bench.charts bench/results/issue10-engines.json --out /tmp/charts
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

RESULTS = Path(__file__).resolve().parent / "results"

#: Layout, in SVG user units (pixels at 100 %).
WIDTH = 760
LABEL_WIDTH = 250
VALUE_WIDTH = 90
ROW = 24
BAR = 15
TOP = 58
AXIS = 34
FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, 'DejaVu Sans', sans-serif"
#: asyncapp's bars and the peers'; both readable on white, which the chart
#: paints itself so that it stays legible on a dark page too.
OURS = "#2563eb"
PEERS = "#9ca3af"
WHISKER = "#374151"


@dataclass(frozen=True)
class Measure:
    """One chart: a figure per server from one scenario's summary."""

    #: Path to the summary in the run's ``scenarios`` (``("engines", "hello")``).
    scenario: tuple[str, ...]
    key: str
    slug: str
    title: str
    unit: str
    #: Which way is better, said on the chart so nobody has to guess.
    better: str
    low: str | None = None
    high: str | None = None
    #: For nested summaries (uploads: a figure per mode).
    mode: str | None = None


MEASURES = [
    Measure(("hello",), "rps", "hello-rps", "Hello world: requests per second", "req/s",
            "higher is better", "rps_min", "rps_max"),
    Measure(("blocking",), "rps", "blocking-rps",
            "A view that sleeps 50 ms, 32 clients: requests per second", "req/s",
            "higher is better; 640 is the ceiling", "rps_min", "rps_max"),
    Measure(("longpoll",), "kb_per_conn", "longpoll-kb", "Memory per held long poll", "KB",
            "lower is better"),
    Measure(("longpoll",), "fanout_ms", "longpoll-fanout",
            "One publish to every held poll: time until the last answer", "ms",
            "lower is better", "fanout_min", "fanout_max"),
    Measure(("upload",), "mib_s", "upload-length", "Upload with Content-Length", "MiB/s",
            "higher is better", mode="length"),
    Measure(("upload",), "mib_s", "upload-chunked", "Chunked upload", "MiB/s",
            "higher is better", mode="chunked"),
    Measure(("engines", "hello"), "rps", "engines-hello-rps",
            "Engines, hello world: requests per second", "req/s", "higher is better",
            "rps_min", "rps_max"),
    Measure(("engines", "longpoll"), "kb_per_conn", "engines-longpoll-kb",
            "Engines: memory per held long poll", "KB", "lower is better"),
    Measure(("engines", "longpoll"), "fanout_ms", "engines-longpoll-fanout",
            "Engines: one publish to every held poll, time until the last answer", "ms",
            "lower is better", "fanout_min", "fanout_max"),
    Measure(("redis",), "fanout_ms", "redis-fanout",
            "One channel over gunicorn workers through Redis: time until the last answer",
            "ms", "lower is better", "fanout_min", "fanout_max"),
    Measure(("websocket",), "kb_per_conn", "websocket-kb", "Memory per idle WebSocket", "KB",
            "lower is better"),
    Measure(("websocket",), "fanout_ms", "websocket-fanout",
            "One publish to every WebSocket: time until the last has it", "ms",
            "lower is better", "fanout_min", "fanout_max"),
    Measure(("websocket",), "echo_per_s", "websocket-echo",
            "WebSocket echo on 50 connections: round trips per second", "round trips/s",
            "higher is better"),
]  # fmt: skip


@dataclass(frozen=True)
class Row:
    name: str
    value: float
    low: float | None
    high: float | None
    #: Long polls held, where the run says (a2wsgi holds a thread per poll,
    #: so it was given far fewer than the others).
    held: int | None = None


def is_ours(name: str) -> bool:
    """asyncapp's own rows: its server, its gunicorn worker, its ASGI bridge."""
    return "asyncapp" in name or "to_asgi" in name


def rows_for(run: dict[str, Any], measure: Measure) -> list[Row]:
    """The measure's figure for each server of the run, best first; [] if absent."""
    data: Any = run.get("scenarios", {})
    for part in measure.scenario:
        if not isinstance(data, dict) or part not in data:
            return []
        data = data[part]
    summary = data.get("summary") if isinstance(data, dict) else None
    if not isinstance(summary, dict):
        return []
    rows = []
    for name, figures in summary.items():
        if measure.mode is not None:
            figures = figures.get(measure.mode, {}) if isinstance(figures, dict) else {}
        if not isinstance(figures, dict) or not _number(figures.get(measure.key)):
            continue
        low = figures.get(measure.low) if measure.low else None
        high = figures.get(measure.high) if measure.high else None
        rows.append(
            Row(
                name,
                float(figures[measure.key]),
                float(low) if _number(low) else None,
                float(high) if _number(high) else None,
                int(figures["n"]) if _number(figures.get("n")) else None,
            )
        )
    higher_better = measure.better.startswith("higher")
    rows.sort(key=lambda r: (-r.value if higher_better else r.value, r.name))
    return rows


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def nice_ticks(top: float, count: int = 5) -> list[float]:
    """Round axis ticks from 0 to at least ``top`` (steps of 1, 2 or 5 x 10^n)."""
    if top <= 0:
        return [0.0, 1.0]
    raw = top / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    ticks = [0.0]
    while ticks[-1] < top:
        ticks.append(ticks[-1] + step)
    return ticks


def fmt(value: float) -> str:
    """A figure as the reports print it: thousands separated, few decimals."""
    if value == int(value) or value >= 100:
        return f"{value:,.0f}"
    if value >= 1:
        return f"{value:,.1f}"
    return f"{value:.2f}"


def svg(measure: Measure, rows: Sequence[Row], source: str) -> str:
    """The chart as a standalone SVG document."""
    top = max(max(r.high or r.value for r in rows), max(r.value for r in rows))
    ticks = nice_ticks(top)
    scale = (WIDTH - LABEL_WIDTH - VALUE_WIDTH) / ticks[-1]
    height = TOP + ROW * len(rows) + AXIS + 22

    def x(value: float) -> float:
        return LABEL_WIDTH + value * scale

    title = f"{measure.title} ({measure.unit}; {measure.better})"
    held = [r.held for r in rows if r.held is not None]
    most = max(held) if held else None
    label = {
        r.name: r.name if r.held in (None, most) else f"{r.name} ({r.held:,} held)" for r in rows
    }
    desc = "; ".join(f"{r.name}: {fmt(r.value)} {measure.unit}" for r in rows)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" '
        f'width="{WIDTH}" height="{height}" role="img" font-family="{escape(FONT)}">',
        f"<title>{escape(title)}</title>",
        f"<desc>{escape(desc)}</desc>",
        f'<rect width="{WIDTH}" height="{height}" fill="#ffffff"/>',
        f'<text x="12" y="22" font-size="15" font-weight="600" fill="#111827">'
        f"{escape(measure.title)}</text>",
        f'<text x="12" y="41" font-size="12" fill="#4b5563">{escape(measure.unit)}, '
        f"{escape(measure.better)}"
        + (f"; {most:,} polls held" if most else "")
        + ("; whiskers: fastest and slowest run" if measure.low else "")
        + "</text>",
    ]
    axis_y = TOP + ROW * len(rows) + 4
    for tick in ticks:
        tx = x(tick)
        out.append(
            f'<line x1="{tx:.1f}" y1="{TOP - 6}" x2="{tx:.1f}" y2="{axis_y}" '
            'stroke="#e5e7eb" stroke-width="1"/>'
        )
        out.append(
            f'<text x="{tx:.1f}" y="{axis_y + 15}" font-size="11" fill="#4b5563" '
            f'text-anchor="middle">{fmt(tick)}</text>'
        )
    for i, row in enumerate(rows):
        y = TOP + i * ROW
        mid = y + BAR / 2
        colour = OURS if is_ours(row.name) else PEERS
        weight = ' font-weight="600"' if is_ours(row.name) else ""
        out.append(
            f'<text x="{LABEL_WIDTH - 8}" y="{mid + 4:.1f}" font-size="12" fill="#111827" '
            f'text-anchor="end"{weight}>{escape(label[row.name])}</text>'
        )
        out.append(
            f'<rect x="{LABEL_WIDTH}" y="{y}" width="{max(row.value * scale, 1):.1f}" '
            f'height="{BAR}" fill="{colour}" rx="2"/>'
        )
        end = row.value
        if row.low is not None and row.high is not None and row.high > row.low:
            out.append(
                f'<line x1="{x(row.low):.1f}" y1="{mid:.1f}" x2="{x(row.high):.1f}" '
                f'y2="{mid:.1f}" stroke="{WHISKER}" stroke-width="1.2"/>'
            )
            for edge in (row.low, row.high):
                out.append(
                    f'<line x1="{x(edge):.1f}" y1="{mid - 4:.1f}" x2="{x(edge):.1f}" '
                    f'y2="{mid + 4:.1f}" stroke="{WHISKER}" stroke-width="1.2"/>'
                )
            end = max(end, row.high)
        out.append(
            f'<text x="{x(end) + 6:.1f}" y="{mid + 4:.1f}" font-size="12" '
            f'fill="#111827">{fmt(row.value)}</text>'
        )
    legend_y = height - 10
    out += [
        f'<rect x="12" y="{legend_y - 10}" width="12" height="12" fill="{OURS}" rx="2"/>',
        f'<text x="30" y="{legend_y}" font-size="11" fill="#374151">asyncapp</text>',
        f'<rect x="96" y="{legend_y - 10}" width="12" height="12" fill="{PEERS}" rx="2"/>',
        f'<text x="114" y="{legend_y}" font-size="11" fill="#374151">other servers</text>',
        f'<text x="{WIDTH - 12}" y="{legend_y}" font-size="11" fill="#6b7280" '
        f'text-anchor="end">{escape(source)}</text>',
        "</svg>",
    ]
    return "\n".join(out) + "\n"


def charts(run: dict[str, Any], stem: str) -> dict[str, str]:
    """File name -> SVG text for every measure the run has figures for."""
    started = run.get("started", "")
    source = f"bench/results/{stem}.json" + (f", {started}" if started else "")
    found = {}
    for measure in MEASURES:
        rows = rows_for(run, measure)
        if rows:
            found[f"{stem}-{measure.slug}.svg"] = svg(measure, rows, source)
    return found


def write(paths: Iterable[Path], out: Path | None = None) -> list[Path]:
    """Draw the charts of each saved run; next to it, or into ``out``."""
    written = []
    for path in paths:
        run = json.loads(path.read_text())
        target = path.parent if out is None else out
        target.mkdir(parents=True, exist_ok=True)
        for name, text in charts(run, path.stem).items():
            dest = target / name
            if not dest.exists() or dest.read_text() != text:
                dest.write_text(text)
            written.append(dest)
    return written


def main(argv: Sequence[str] | None = None, echo: Callable[[str], None] = print) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.charts", description=__doc__.split("\n")[0]
    )
    parser.add_argument("runs", nargs="*", type=Path, help="saved runs (default: every one)")
    parser.add_argument("--out", type=Path, default=None, help="directory (default: the run's)")
    args = parser.parse_args(argv)
    paths = args.runs or sorted(RESULTS.glob("*.json"))
    if not paths:
        parser.error(f"no saved runs in {RESULTS}: run python -m bench first")
    for dest in write(paths, args.out):
        echo(str(dest))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
