"""bench freshness: the worst request of a swap window, placed in the reload phase it was sent in."""

from __future__ import annotations

from towerann.bench.freshness import worst_request


def test_worst_request_names_the_reload_phase_it_was_sent_in() -> None:
    t0 = 1000.0
    sent = [t0 + i * 0.01 for i in range(300)]  # 100 req/s for 3 s
    lat = [2.0] * 300
    lat[150] = 90.0  # sent 1.5 s in: 1.2 s of load, then validate
    lat[160] = 400.0  # slower, but failed: not counted
    status = [200] * 300
    status[160] = 0
    timeline = {"sent_unix": sent, "latency_ms": lat, "status": status}
    reload = {"phases_start_unix": t0 + 0.2, "phases_s": {"load": 1.2, "validate": 0.5, "replay": 0.01, "swap": 0.001}}
    got = worst_request(timeline, (t0, t0 + 3.0), reload)
    assert got["latency_ms"] == 90.0 and got["phase"] == "validate" and got["after_reload_start_s"] == 1.3
    lat[10] = 95.0  # sent before the reload began
    assert worst_request(timeline, (t0, t0 + 3.0), reload)["phase"] == "before"
    lat[290] = 99.0  # after every phase
    assert worst_request(timeline, (t0, t0 + 3.0), reload)["phase"] == "after"
    assert worst_request(timeline, (t0, t0 + 3.0), {})["latency_ms"] == 99.0  # a refused reload has no phases
    assert worst_request(timeline, (t0 + 10, t0 + 11), reload) == {}
