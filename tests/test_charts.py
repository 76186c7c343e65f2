"""``python -m bench.charts``: the benchmark charts the docs show."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from bench import charts

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"
#: The runs the docs draw charts from (docs/benchmarks.md, docs/comparison.md).
COMMITTED = [
    "issue9-hello-blocking.json",
    "issue10-engines.json",
    "issue11-redis.json",
    "issue12-websocket.json",
]


@pytest.mark.parametrize("name", COMMITTED)
def test_committed_runs_draw_valid_deterministic_svg(name: str, tmp_path: Path) -> None:
    run = json.loads((RESULTS / name).read_text())
    drawn = charts.charts(run, Path(name).stem)
    assert drawn
    for text in drawn.values():
        root = ET.fromstring(text)
        assert root.tag.endswith("svg") and root.get("role") == "img"
        assert root.find("{http://www.w3.org/2000/svg}title") is not None
    assert charts.charts(run, Path(name).stem) == drawn  # nothing random in them


def test_the_command_writes_every_chart(tmp_path: Path) -> None:
    lines: list[str] = []
    paths = [str(RESULTS / name) for name in COMMITTED]
    assert charts.main([*paths, "--out", str(tmp_path)], echo=lines.append) == 0
    assert sorted(Path(line).name for line in lines) == sorted(p.name for p in tmp_path.iterdir())
    assert (tmp_path / "issue10-engines-engines-longpoll-kb.svg").is_file()


def test_rows_are_ordered_best_first_and_missing_scenarios_draw_nothing() -> None:
    run = {
        "scenarios": {
            "hello": {"summary": {"a": {"rps": 1.0}, "asyncapp-gen": {"rps": 3.0}}},
            "longpoll": {"summary": {"b": {"kb_per_conn": 9.0}, "c": {"kb_per_conn": 2.0}}},
        }
    }
    hello = next(m for m in charts.MEASURES if m.slug == "hello-rps")
    kb = next(m for m in charts.MEASURES if m.slug == "longpoll-kb")
    assert [r.name for r in charts.rows_for(run, hello)] == ["asyncapp-gen", "a"]
    assert [r.name for r in charts.rows_for(run, kb)] == ["c", "b"]
    assert set(charts.charts(run, "x")) == {"x-hello-rps.svg", "x-longpoll-kb.svg"}


@pytest.mark.parametrize(
    ("top", "ticks"),
    [(22926, [0, 5000, 10000, 15000, 20000, 25000]), (4.6, [0, 1, 2, 3, 4, 5]), (0, [0, 1])],
)
def test_nice_ticks(top: float, ticks: list[float]) -> None:
    assert charts.nice_ticks(top) == ticks
