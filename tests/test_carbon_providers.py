"""Online providers against a local HTTP server (127.0.0.1 only): data, errors, time-outs."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from llem import carbon
from llem.carbon import providers
from llem.carbon.hourly import cache_path, read_cache
from llem.config import CarbonConfig, Config
from llem.errors import ConfigError

H = 3600
T22 = int(datetime(2024, 3, 30, 22, tzinfo=timezone.utc).timestamp())
KWH_J = 3.6e6


def em_point(iso, g):
    """One entry of Electricity Maps' v3 carbon-intensity answer, as documented."""
    return {
        "zone": "DE",
        "carbonIntensity": g,
        "datetime": iso,
        "updatedAt": "2024-03-31T06:00:00.000Z",
        "createdAt": "2024-03-28T00:00:00.000Z",
        "emissionFactorType": "lifecycle",
        "isEstimated": False,
        "estimationMethod": None,
    }


EM_BODY = {
    "zone": "DE",
    "data": [
        em_point("2024-03-30T22:00:00.000Z", 302),
        em_point("2024-03-30T23:00:00.000Z", 298),
        em_point("2024-03-31T00:00:00.000Z", 290),
    ],
}

UK_BODY = {
    "data": [
        {"from": "2024-03-30T22:00Z", "to": "2024-03-30T22:30Z",
         "intensity": {"forecast": 120, "actual": 110, "index": "low"}},
        {"from": "2024-03-30T22:30Z", "to": "2024-03-30T23:00Z",
         "intensity": {"forecast": 130, "actual": 130, "index": "low"}},
        {"from": "2024-03-30T23:00Z", "to": "2024-03-30T23:30Z",
         "intensity": {"forecast": 100, "actual": None, "index": "low"}},
        {"from": "2024-03-30T23:30Z", "to": "2024-03-31T00:00Z",
         "intensity": {"forecast": 90, "actual": 96, "index": "low"}},
        {"from": "2024-03-31T00:00Z", "to": "2024-03-31T00:30Z",
         "intensity": {"forecast": 80, "actual": 82, "index": "very low"}},
    ]
}  # fmt: skip


class Server:
    """A local server answering every GET with the configured status, body and delay."""

    def __init__(self):
        self.status, self.body, self.delay_s = 200, b"{}", 0.0
        self.requests: list[tuple[str, dict[str, str]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                if outer.delay_s:
                    time.sleep(outer.delay_s)
                try:
                    self.send_response(outer.status)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(outer.body)
                except OSError:
                    pass  # the client gave up (time-out test)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def serve(self, body, status=200, delay_s=0.0):
        self.body = json.dumps(body).encode() if not isinstance(body, bytes) else body
        self.status, self.delay_s = status, delay_s


@pytest.fixture(autouse=True)
def _no_public_hosts(monkeypatch):
    """Should a test forget provider_url, it reaches a closed local port, never the internet."""
    local = {name: "http://127.0.0.1:9" for name in providers.DEFAULT_URLS}
    monkeypatch.setattr(providers, "DEFAULT_URLS", local)


@pytest.fixture
def server():
    s = Server()
    s.thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def em_config(server, **kw):
    return Config(
        carbon=CarbonConfig(
            region="DE", provider="electricitymaps", provider_token="secret-token",
            provider_url=server.url, **kw,
        )
    )  # fmt: skip


def test_electricitymaps_fills_the_cache_and_is_used(server, tmp_path):
    server.serve(EM_BODY)
    energy = {T22: KWH_J, T22 + H: KWH_J, T22 + 2 * H: 2 * KWH_J}
    result = carbon.emissions(em_config(server), energy, cache_dir=str(tmp_path))

    assert result.operational_g == pytest.approx(302 + 298 + 2 * 290)
    assert result.carbon["source"] == "Electricity Maps (DE)"
    assert result.carbon["basis"] == "lifecycle"
    assert result.carbon["hourly_coverage"] == 1.0
    assert result.carbon["notes"] == []
    ((path, headers),) = server.requests
    assert path.startswith("/v3/carbon-intensity/past-range?zone=DE&start=2024-03-30T22%3A00")
    assert "end=2024-03-31T01%3A00%3A00Z" in path
    assert headers["auth-token"] == "secret-token"
    cached = read_cache(cache_path(tmp_path, "electricitymaps", "DE"))
    assert cached == {T22: 302.0, T22 + H: 298.0, T22 + 2 * H: 290.0}

    # The same hours again: answered from the cache, no request.
    again = carbon.emissions(em_config(server), energy, cache_dir=str(tmp_path))
    assert again.operational_g == result.operational_g
    assert len(server.requests) == 1


def test_http_error_falls_back_to_the_table_and_says_so(server, tmp_path):
    server.serve({"error": "boom"}, status=500)
    result = carbon.emissions(em_config(server), {T22: KWH_J}, cache_dir=str(tmp_path))
    de = carbon.lookup("DE")
    assert result.operational_g == pytest.approx(de.g_per_kwh)
    assert result.carbon["fallback_hours"] == 1
    assert result.carbon["hourly_coverage"] == 0.0
    assert result.carbon["source"] == de.source
    (note,) = result.carbon["notes"]
    assert note.startswith("Electricity Maps: HTTP 500")
    assert "use the annual figure" in note


def test_time_out_falls_back_to_the_table_and_says_so(server, tmp_path):
    server.serve(EM_BODY, delay_s=2.0)
    config = em_config(server, provider_timeout_s=0.3)
    started = time.monotonic()
    result = carbon.emissions(config, {T22: KWH_J}, cache_dir=str(tmp_path))
    assert time.monotonic() - started < 1.9
    assert result.operational_g == pytest.approx(carbon.lookup("DE").g_per_kwh)
    assert result.carbon["fallback_hours"] == 1
    assert "no answer within 0.3 s" in result.carbon["notes"][0]
    assert not cache_path(tmp_path, "electricitymaps", "DE").exists()


def test_malformed_answer_falls_back(server):
    server.serve(b"<html>maintenance</html>")
    result = carbon.emissions(em_config(server), {T22: KWH_J})
    assert "malformed answer" in result.carbon["notes"][0]
    assert result.carbon["fallback_hours"] == 1


def test_uk_carbon_intensity_half_hours_make_hourly_means(server, tmp_path):
    server.serve(UK_BODY)
    config = Config(
        carbon=CarbonConfig(region="GB", provider="uk-carbon-intensity", provider_url=server.url)
    )
    energy = {T22: KWH_J, T22 + H: KWH_J, T22 + 2 * H: KWH_J}
    result = carbon.emissions(config, energy, cache_dir=str(tmp_path))
    ((path, _),) = server.requests
    assert path == "/intensity/2024-03-30T22:00Z/2024-03-31T01:00Z"
    # 22:00: (110 + 130) / 2; 23:00: forecast 100 where no actual, then 96; 00:00 has one
    # half hour only, so it falls back to GB's annual figure.
    gb = carbon.lookup("GB").g_per_kwh
    assert result.operational_g == pytest.approx(120 + 98 + gb)
    assert result.carbon["fallback_hours"] == 1
    assert result.carbon["source"].startswith("UK Carbon Intensity API (NESO, national)")
    assert result.carbon["basis"].startswith("direct")
    assert "no figure for 1 hour(s)" in result.carbon["notes"][0]


def test_long_ranges_are_split_into_the_providers_maximum(server):
    server.serve({"zone": "DE", "data": []})
    hours = [T22 + i * H for i in range(15 * 24)]  # 15 days: two Electricity Maps requests
    result = providers.lookup_hours(
        "electricitymaps", "DE", hours, cache_dir=None, token="t", url=server.url, timeout_s=5
    )
    assert len(server.requests) == 2
    assert len(result.series) == 0


def test_provider_configuration_errors():
    with pytest.raises(ConfigError, match="needs carbon.provider_token"):
        carbon.resolve(Config(carbon=CarbonConfig(region="DE", provider="electricitymaps")))
    with pytest.raises(ConfigError, match="did you mean 'electricitymaps'"):
        carbon.resolve(Config(carbon=CarbonConfig(region="DE", provider="electricitymap")))


def test_nothing_is_fetched_when_no_hours_are_asked(server):
    model = carbon.resolve(em_config(server))
    assert server.requests == []
    assert model.for_hour(T22).flagged_fallback is True


def test_an_unreadable_cache_is_ignored_said_and_replaced(server, tmp_path):
    path = cache_path(tmp_path, "electricitymaps", "DE")
    path.write_text("garbage\n", encoding="utf-8")
    server.serve(EM_BODY)
    result = carbon.emissions(em_config(server), {T22: KWH_J}, cache_dir=str(tmp_path))
    assert result.operational_g == pytest.approx(302)
    assert "ignoring the unreadable intensity cache" in result.carbon["notes"][0]
    assert read_cache(path) == {T22: 302.0}


def test_the_public_url_is_the_default_and_never_reached_here():
    # With the guard above, a forgotten provider_url fails fast on a closed local port.
    config = Config(carbon=CarbonConfig(region="GB", provider="uk-carbon-intensity"))
    result = carbon.emissions(config, {T22: KWH_J})
    assert "cannot connect" in result.carbon["notes"][0]
    assert result.carbon["fallback_hours"] == 1
