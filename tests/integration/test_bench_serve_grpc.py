"""`towerann bench serve --grpc` on a tiny workload: the same rates offered over HTTP and gRPC to one real
server (`serve --grpc-port`), both answered in full, both in the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from towerann.cli import main


def test_bench_serve_grpc_measures_both_transports_in_one_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = ["bench", "serve", "--items", "2000", "--users", "300", "--dim", "16", "--kind", "exact"]
    args += ["--store", "embedded", "--rates", "40", "80", "--duration", "1", "--events", "10"]
    args += ["--inproc-requests", "20", "--k", "100", "--connections", "4", "--grpc"]
    assert main([*args, "--workdir", str(tmp_path / "work"), "--out", str(out)]) == 0
    result = json.loads(next(out.glob("serve-2000-k100-exact-embedded.json")).read_text())
    assert [r["target_rps"] for r in result["grpc"]] == [r["target_rps"] for r in result["http"]] == [40, 80]
    for rate in (*result["http"], *result["grpc"]):
        assert rate["errors"] == {} and rate["ok"] == rate["sent"] > 0, rate
        assert set(rate["stages"]) == {"features", "user_tower", "ann", "total"}
        assert 0 < rate["end_to_end"]["p50_ms"] <= rate["end_to_end"]["p99_ms"]
    assert result["grpc_saturation_rps"] > 0 and "grpc_max_sustained_rps" in result
    printed = capsys.readouterr().out
    assert "[gRPC]" in printed and "[HTTP]" in printed and "gRPC: saturation" in printed
