"""bench freshness: the worst request of a swap window, placed in the reload phase it was sent in; a load that
ended before the swaps is a failed run, not a nan."""

from __future__ import annotations

from towerann.bench.freshness import load_shortfall_s, worst_request


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


def test_a_load_that_ends_before_the_swaps_is_short_by_the_missing_seconds() -> None:
    timeline = {"sent_unix": [1000.0 + i * 0.01 for i in range(36_000)], "latency_ms": [], "status": []}  # 360 s
    assert load_shortfall_s(timeline, swaps_end=1300.0, steady_s=15) == 0.0  # 1 s + 7.5 s of steady load after
    assert load_shortfall_s(timeline, swaps_end=1351.0, steady_s=15) == 0.0  # 8.99 s left: enough
    assert abs(load_shortfall_s(timeline, swaps_end=1400.0, steady_s=15) - 48.51) < 1e-6
