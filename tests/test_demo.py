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
    result = run_cli("demo", "--format", "json", "--min-run-time", "0.02", "--model", "builtin")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["rows"]
    assert [row["params"] for row in rows] == [2912, 452, 442]
    assert [row["cost"]["flops"] for row in rows] == [66_355_200, 9_446_400, 9_446_400]
    conversion = json.loads(result.stdout)["conversion"]["rows"]
    assert [row["setting"] for row in conversion] == ["original", "rank 1", "MAC budget 0.25", "full rank (exact)"]
    table = run_cli("demo", "--min-run-time", "0.02", "--model", "none")
    assert table.returncode == 0, table.stderr
    assert "standard 2912, seed dw+pw 452, sepconv 442" in table.stdout
    assert "33,177,600" in table.stdout


def test_cli_errors_are_one_line_with_exit_code_2() -> None:
    result = run_cli("demo", "--min-run-time", "-1")
    assert result.returncode == 2
    assert result.stderr.strip() == "sepconv demo: error: --min-run-time must be > 0 seconds, got -1.0"
    assert run_cli("--version").stdout.startswith("sepconv ")


def test_conversion_experiment_on_the_builtin_cnn() -> None:

    from sepconv.demo import conversion_experiment
    from sepconv.nets import small_resnet

    name, rows = conversion_experiment(model="builtin", min_run_time=0.01)
    assert "small_resnet" in name
    original, rank1, budget, full = rows
    assert original.params == sum(p.numel() for p in small_resnet().parameters())
    assert original.relative_output_error == 0.0 and full.relative_output_error < 1e-4
    assert rank1.macs < budget.macs < original.macs < full.macs  # full rank 9 > 3x3 conv's cost
    assert rank1.relative_output_error > 0.05  # random weights: rank 1 is far from exact
    assert all(row.latency.median_ms > 0 for row in rows)
