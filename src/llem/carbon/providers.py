"""Optional online providers of hourly intensity, filling the hourly cache.

Off by default and never needed: llem works on its shipped tables. When
``carbon.provider`` is set, the hours a computation needs are looked up in a file cache (one
CSV per provider and zone, in the ``carbon.intensity_file`` format) and only the missing ones
are fetched. Any failure (HTTP error, time-out, malformed answer) is not an error of the
computation: the hours stay uncovered, fall back to the annual table, and the returned notes
say why. Standard library only (urllib).

* Electricity Maps (``electricitymaps``), API v3, with a token: ``GET
  {url}/v3/carbon-intensity/past-range?zone=Z&start=...&end=...`` with header ``auth-token``;
  answer ``{"zone": Z, "data": [{"datetime": ..., "carbonIntensity": g, ...}]}``; at most 10
  days a request.
* UK Carbon Intensity API (``uk-carbon-intensity``, national, Great Britain), no token: ``GET
  {url}/intensity/{from}/{to}``; answer ``{"data": [{"from": ..., "to": ..., "intensity":
  {"forecast": g, "actual": g, "index": ...}}]}`` per half hour; at most 14 days a request.
  An hour's figure is the mean of its two half hours, ``actual`` where published, else
  ``forecast``.
"""

from __future__ import annotations

import json
import logging
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone

from llem.carbon.hourly import (
    MAX_G_PER_KWH,
    SECONDS_PER_HOUR,
    HourlySeries,
    cache_path,
    iso_hour,
    parse_utc_timestamp,
    read_cache,
    write_cache,
)
from llem.errors import ConfigError

log = logging.getLogger(__name__)

ELECTRICITYMAPS = "electricitymaps"
UK_CARBON_INTENSITY = "uk-carbon-intensity"
PROVIDERS = (ELECTRICITYMAPS, UK_CARBON_INTENSITY)
DEFAULT_URLS = {
    ELECTRICITYMAPS: "https://api.electricitymap.org",
    UK_CARBON_INTENSITY: "https://api.carbonintensity.org.uk",
}
LABELS = {
    ELECTRICITYMAPS: "Electricity Maps",
    UK_CARBON_INTENSITY: "UK Carbon Intensity API (NESO, national)",
}
BASES = {ELECTRICITYMAPS: "lifecycle", UK_CARBON_INTENSITY: "direct"}
MAX_RANGE_HOURS = {ELECTRICITYMAPS: 10 * 24, UK_CARBON_INTENSITY: 14 * 24}


class ProviderError(Exception):
    """A provider could not deliver (HTTP error, time-out, malformed answer)."""


@dataclass(frozen=True)
class ProviderResult:
    """What a provider lookup produced.

    Attributes:
        series: the cached and fetched hours that were asked for.
        notes: human-readable notes on failures and on hours left uncovered.
    """

    series: HourlySeries
    notes: tuple[str, ...] = ()


Fetcher = Callable[[str, dict[str, str], float], bytes]


def http_get(url: str, headers: dict[str, str], timeout_s: float) -> bytes:
    """GET a URL; raise ProviderError on an HTTP error, a network error or a time-out."""
    request = urllib.request.Request(url, headers={"Accept": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.read()
    except urllib.error.HTTPError as e:
        raise ProviderError(f"HTTP {e.code} {e.reason}") from e
    except TimeoutError as e:
        raise ProviderError(f"no answer within {timeout_s:g} s") from e
    except urllib.error.URLError as e:
        if isinstance(e.reason, (socket.timeout, TimeoutError)):
            raise ProviderError(f"no answer within {timeout_s:g} s") from e
        raise ProviderError(f"cannot connect: {e.reason}") from e
    except OSError as e:
        raise ProviderError(f"network error: {e}") from e


def _json(body: bytes) -> dict:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProviderError(f"malformed answer (not JSON): {e}") from e
    if not isinstance(data, dict):
        raise ProviderError("malformed answer: not a JSON object")
    return data


def _plausible(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if 0 <= value <= MAX_G_PER_KWH else None


def _iso_minute(epoch_s: int) -> str:
    return datetime.fromtimestamp(epoch_s, tz=timezone.utc).strftime("%Y-%m-%dT%H:%MZ")


def fetch_electricitymaps(
    zone: str,
    start_s: int,
    end_s: int,
    *,
    token: str,
    url: str,
    timeout_s: float,
    get: Fetcher = http_get,
) -> dict[int, float]:
    """Hourly intensities of ``zone`` for hours in [start_s, end_s) (one request)."""
    query = urllib.parse.urlencode(
        {"zone": zone, "start": iso_hour(start_s), "end": iso_hour(end_s)}
    )
    answer = get(f"{url}/v3/carbon-intensity/past-range?{query}", {"auth-token": token}, timeout_s)
    data = _json(answer)
    points = data.get("data", data.get("history"))
    if not isinstance(points, list):
        raise ProviderError("malformed answer: no 'data' list")
    out = {}
    for point in points:
        try:
            ts = parse_utc_timestamp(str(point["datetime"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ProviderError(f"malformed answer: bad 'datetime' in {point!r}") from e
        value = _plausible(point.get("carbonIntensity"))
        if value is not None and ts % SECONDS_PER_HOUR == 0 and start_s <= ts < end_s:
            out[ts] = value
    return out


def fetch_uk_carbon_intensity(
    start_s: int, end_s: int, *, url: str, timeout_s: float, get: Fetcher = http_get
) -> dict[int, float]:
    """Hourly means of GB's half-hourly national intensity for hours in [start_s, end_s)."""
    answer = get(f"{url}/intensity/{_iso_minute(start_s)}/{_iso_minute(end_s)}", {}, timeout_s)
    data = _json(answer)
    points = data.get("data")
    if not isinstance(points, list):
        raise ProviderError("malformed answer: no 'data' list")
    halves: dict[int, list[float]] = {}
    for point in points:
        try:
            ts = parse_utc_timestamp(str(point["from"]))
            intensity = point["intensity"]
        except (KeyError, TypeError, ValueError) as e:
            raise ProviderError(f"malformed answer: bad half hour {point!r}") from e
        actual = intensity.get("actual") if isinstance(intensity, dict) else None
        value = _plausible(actual if actual is not None else intensity.get("forecast"))
        hour = ts - ts % SECONDS_PER_HOUR
        if value is not None and start_s <= hour < end_s:
            halves.setdefault(hour, []).append(value)
    # An hour needs both of its half hours; half an hour is not the hour's mean.
    return {hour: sum(v) / 2 for hour, v in halves.items() if len(v) == 2}


def _runs(hours: list[int], max_hours: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges covering ``hours`` (sorted), each at most max_hours."""
    runs: list[tuple[int, int]] = []
    for hour in hours:
        if runs and hour == runs[-1][1] and (hour - runs[-1][0]) < max_hours * SECONDS_PER_HOUR:
            runs[-1] = (runs[-1][0], hour + SECONDS_PER_HOUR)
        else:
            runs.append((hour, hour + SECONDS_PER_HOUR))
    return runs


def check_provider(provider: str, token: str | None) -> None:
    """Raise ConfigError for an unknown provider or a missing token."""
    if provider not in PROVIDERS:
        import difflib

        near = difflib.get_close_matches(provider, PROVIDERS, n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise ConfigError(
            f"unknown carbon.provider '{provider}' (valid: {', '.join(PROVIDERS)}){hint}"
        )
    if provider == ELECTRICITYMAPS and not token:
        raise ConfigError("carbon.provider 'electricitymaps' needs carbon.provider_token")


def lookup_hours(
    provider: str,
    zone: str | None,
    hours: Iterable[int],
    *,
    cache_dir: str | None,
    token: str | None = None,
    url: str | None = None,
    timeout_s: float = 10.0,
    get: Fetcher = http_get,
) -> ProviderResult:
    """The provider's intensity for ``hours``: from the cache, fetching what is missing.

    Args:
        provider: ``electricitymaps`` or ``uk-carbon-intensity``.
        zone: the provider's zone (Electricity Maps); ignored by the UK API (national).
        hours: UTC epoch seconds of hour starts.
        cache_dir: directory of the file cache; None keeps fetched hours in memory only.
        token: the Electricity Maps token.
        url: the API's base URL (default the public one; tests use a local server).
        timeout_s: time-out of each request.
        get: the HTTP GET function (injectable).

    Raises:
        ConfigError: unknown provider, or a missing token or zone. Network and answer failures
            are not raised: they become notes, and the hours stay uncovered.
    """
    check_provider(provider, token)
    if not timeout_s > 0:
        raise ConfigError(f"carbon.provider_timeout_s must be positive, got {timeout_s}")
    if provider == ELECTRICITYMAPS and not zone:
        raise ConfigError("carbon.provider 'electricitymaps' needs carbon.region (its zone)")
    zone_key = zone if provider == ELECTRICITYMAPS else "GB"
    base = (url or DEFAULT_URLS[provider]).rstrip("/")
    label = LABELS[provider]
    wanted = sorted({h - h % SECONDS_PER_HOUR for h in hours})
    path = cache_path(cache_dir, provider, zone_key) if cache_dir else None
    notes: list[str] = []
    try:
        cached = read_cache(path) if path else {}
    except ConfigError as e:
        notes.append(f"ignoring the unreadable intensity cache: {e}")
        cached = {}
    missing = [h for h in wanted if h not in cached]
    fetched: dict[int, float] = {}
    for start, end in _runs(missing, MAX_RANGE_HOURS[provider]):
        try:
            if provider == ELECTRICITYMAPS:
                got = fetch_electricitymaps(
                    zone_key, start, end, token=token or "", url=base, timeout_s=timeout_s, get=get
                )
                fetched.update(got)
            else:
                fetched.update(
                    fetch_uk_carbon_intensity(start, end, url=base, timeout_s=timeout_s, get=get)
                )
        except ProviderError as e:
            log.warning("%s: %s; falling back to the annual table", label, e)
            notes.append(
                f"{label}: {e} for {iso_hour(start)} to {iso_hour(end)}; those hours use the "
                "annual figure"
            )
    if fetched and path:
        try:
            write_cache(path, fetched)
        except ConfigError:
            write_cache(path, fetched, merge=False)  # replace an unreadable cache
        except OSError as e:
            notes.append(f"cannot write the intensity cache {path}: {e}")
    known = {**cached, **fetched}
    got = {h: known[h] for h in wanted if h in known}
    left = len(wanted) - len(got)
    if left and not notes:
        notes.append(f"{label}: no figure for {left} hour(s); those hours use the annual figure")
    source = f"{label} ({zone_key})" if provider == ELECTRICITYMAPS else label
    series = HourlySeries(got, source=source, region=zone_key, basis=BASES[provider])
    return ProviderResult(series, tuple(notes))
