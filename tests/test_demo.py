"""The seed experiment and the CLI, run as a user runs them (a subprocess)."""

import json
import subprocess
import sys

from sepconv.demo import seed_experiment


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sepconv", *args], capture_output=True, text=True, timeout=120)


def test_seed_experiment_numbers() -> None:
    rows = seed_experiment(min_run_time=0.01)
    assert [row.params for row in rows] == [2912, 452, 442]
    assert [row.cost.macs for row in rows] == [33_177_600, 4_723_200, 4_723_200]
    assert {row.output_shape for row in rows} == {(5, 32, 48, 48)}
    assert all(row.latency.median_ms > 0 and row.latency.runs >= 1 for row in rows)


def test_demo_json_and_table() -> None:
    result = run_cli("demo", "--format", "json", "--min-run-time", "0.02")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["rows"]
    assert [row["params"] for row in rows] == [2912, 452, 442]
    assert [row["cost"]["flops"] for row in rows] == [66_355_200, 9_446_400, 9_446_400]
    table = run_cli("demo", "--min-run-time", "0.02")
    assert table.returncode == 0, table.stderr
    assert "standard 2912, seed dw+pw 452, sepconv 442" in table.stdout
    assert "33,177,600" in table.stdout


def test_cli_errors_are_one_line_with_exit_code_2() -> None:
    result = run_cli("demo", "--min-run-time", "-1")
    assert result.returncode == 2
    assert result.stderr.strip() == "sepconv demo: error: --min-run-time must be > 0 seconds, got -1.0"
    assert run_cli("--version").stdout.startswith("sepconv ")
