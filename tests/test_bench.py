"""`serval bench` produces a complete report (no timing is asserted: speed lives in the benchmark)."""

from serval.bench import format_report, run_benchmark


def test_benchmark_report_structure():
    report = run_benchmark("tiny", "cpu", batch_size=2, seconds=(1.0,), min_seconds=0.0)
    (row,) = report["results"]
    assert row["published_fp32_30s"]["clips_per_s"] > 0 and row["serval_own_length"]["clips_per_s"] > 0
    assert row["speedup_batch"] == round(
        row["serval_own_length"]["clips_per_s"] / row["published_fp32_30s"]["clips_per_s"], 2
    )
    table = format_report(report)
    assert "| 1 s |" in table and "Whisper-tiny" in table
