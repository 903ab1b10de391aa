"""`towerann bench soak`, the short version CI runs: a real server, a real Redis killed with SIGKILL
and restarted under load, a real refresh + hot swap; nothing acknowledged may be lost."""

from __future__ import annotations

import json
from pathlib import Path

from towerann.cli import main


def test_short_soak_loses_nothing_and_answers_no_5xx_outside_the_redis_outage(tmp_path: Path, spawn_redis) -> None:
    # spawn_redis: only to skip (outside CI) where redis-server is missing; the soak starts its own Redis.
    out = tmp_path / "out"
    rc = main(
        [
            "bench",
            "soak",
            "--items",
            "2000",
            "--users",
            "300",
            "--dim",
            "16",
            "--kind",
            "exact",
            "--recall",
            "0",
            "--duration",
            "40",
            "--rate",
            "40",
            "--redis-down-s",
            "1",
            "--workdir",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    r = json.loads((out / "soak-2000-exact-40s.json").read_text())
    assert r["sent"] == 1600 and (out / "soak-2000-exact-40s.png").stat().st_size > 0
    ev = r["events"]
    assert ev["refresh_start"] < ev["swap_start"] <= ev["swap_end"] and ev["redis_kill"] < ev["redis_ready"], ev
    # Both under load (the rebuild at 35% of the run, the crash at 70%, whatever the rebuild is doing then).
    assert r["swap_under_load"] and r["outage_under_load"], ev
    assert r["reload"]["outcome"] == "swapped", r["reload"]
    # The outage was real and under load: writes or clicks were refused with 503, reads degraded.
    during = r["statuses_during_outage"]
    assert during["click"].get("503", 0) + during["write"].get("503", 0) > 0, during
    assert set(during["read"]) == {"200"} and r["degraded_reads"]["during_outage"] > 0, (during, r["degraded_reads"])
    assert r["server_errors_outside_outage"] == 0, r["statuses_outside_outage"]
    assert all(set(codes) == {"200"} for codes in r["statuses_outside_outage"].values()), r["statuses_outside_outage"]
    rb = r["readback"]
    assert rb["items_acknowledged"] > 50 and rb["clicks_acknowledged"] > 150, rb
    assert rb["items_lost"] == 0 and rb["clicks_lost"] == 0, rb
    assert r["targets"]["no acknowledged write lost"] and r["targets"]["no 5xx outside the Redis outage"]
