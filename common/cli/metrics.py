"""Prometheus metrics of one market's token, for ``COMMAND metrics`` (stdout or a textfile).

Everything comes from the local files (the token record and the shared renewal memory); rendering
never talks to the broker and never renews. Every sample carries the labels ``market`` (``us`` or
``kr``) and ``environment`` (``real`` or ``paper``); the HELP texts do not depend on the market, so
the US and KR textfiles can sit side by side in node_exporter's textfile directory.

Gauges:

* ``kis_token_present``: 1 if a usable token record is stored, else 0.
* ``kis_token_valid``: 1 if the token has more than the 5 min expiry margin left, else 0.
* ``kis_token_renewal_due``: 1 if the token is valid but inside the renewal window, else 0.
* ``kis_token_expiry_timestamp_seconds``: the broker's expiry, epoch seconds (*).
* ``kis_token_issued_timestamp_seconds``: when the token was obtained, epoch seconds (*).
* ``kis_token_seconds_left``: expiry minus now, negative once expired (*).
* ``kis_token_last_renewal_success_timestamp_seconds``: when a token was last obtained (**).
* ``kis_token_last_request_timestamp_seconds``: when a token was last requested (**).

Counters:

* ``kis_token_renewals_total``: tokens obtained (new, or the same one re-sent by the broker).
* ``kis_token_refusals_total{code="EGW00133"}``: refusals by broker code; ``code="LOCAL"`` counts
  requests this host held back itself (one a minute).
* ``kis_token_failures_total``: requests that failed without a broker code (network, 5xx, garbage).

The key's call budget (shared by every process and host of the app key, so the US and KR files
of one key show the same values):

* ``kis_token_call_rate_limit``: the broker's limit for the key, calls a second (``KIS_RATE_LIMIT``).
* ``kis_token_calls_last_minute``: calls the budget let through in the last 60 s (***).
* ``kis_token_egw00201_last_minute``: ``EGW00201`` answers seen in the last 60 s (***).
* ``kis_token_egw00201_total`` (counter): ``EGW00201`` answers seen since the budget's state was
  made (***).
* ``kis_token_call_budget_store_down``: 1 if a token store is configured but does not answer (each
  host paces the key on its own), else 0 (***).

(*) only when a record is present; (**) only when known; (***) only when the budget's counters
could be read. A family without a value is still
declared (HELP and TYPE lines) but has no sample.

The counters live in the key's renewal state (``key-<id>.state``, and the shared store's copy)
and count from its creation.

Suggested alert rules: ``kis_token_valid == 0``; ``kis_token_seconds_left < 900``;
``increase(kis_token_refusals_total[1h]) > 0``; ``increase(kis_token_egw00201_total[10m]) > 0``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from common.clock import parse_iso
from common.store.files import atomic_write

#: Textfiles are read by node_exporter, which often runs as another user; they hold no secret.
TEXTFILE_MODE = 0o644
LABELS = ("market", "environment")


class TokenCollector(Collector):
    """A one-shot Prometheus collector over one manager's local token state."""

    def __init__(self, manager: Any) -> None:
        self.manager = manager

    def describe(self) -> list[Metric]:
        """Nothing up front: keeps registration from collecting (and reading files) early."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Read the token's status and the renewal memory and yield every metric family."""
        manager = self.manager
        info = manager.get_token_info()
        state = manager.load_renewal_state()
        present = info["present"]
        expires_at = parse_iso(info["expires_at"]) if present else None
        labels = [info["market"], info["environment"]]

        def gauge(name: str, doc: str, value: float | None) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=LABELS)
            if value is not None:
                family.add_metric(labels, float(value))
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=LABELS)
            family.add_metric(labels, float(value))
            return family

        yield gauge("kis_token_present", "1 if a usable KIS token record is stored, else 0.", int(present))
        yield gauge(
            "kis_token_valid",
            "1 if the stored KIS token has more than the expiry margin left, else 0.",
            int(info["valid"]),
        )
        yield gauge(
            "kis_token_renewal_due",
            "1 if the KIS token is valid but inside the renewal window, else 0.",
            int(info["status"] == "renewal_due"),
        )
        yield gauge(
            "kis_token_expiry_timestamp_seconds",
            "Expiry of the stored KIS token as stated by the broker, epoch seconds.",
            expires_at,
        )
        yield gauge(
            "kis_token_issued_timestamp_seconds",
            "When the stored KIS token was obtained, epoch seconds.",
            parse_iso(info["issued_at"]) if present else None,
        )
        yield gauge(
            "kis_token_seconds_left",
            "Seconds until the stored KIS token expires (negative once expired).",
            None if expires_at is None else expires_at - manager.now(),
        )
        yield counter(
            "kis_token_renewals",
            "KIS tokens obtained (new or re-sent by the broker) on this host.",
            state.renewals,
        )
        refusals = CounterMetricFamily(
            "kis_token_refusals",
            "KIS token requests refused, by broker code (LOCAL: held back by this host).",
            labels=(*LABELS, "code"),
        )
        for code, count in sorted(state.refusals.items()):
            refusals.add_metric([*labels, code], float(count))
        yield refusals
        yield counter(
            "kis_token_failures",
            "KIS token requests that failed without a broker code (network, 5xx, bad answer).",
            state.failures,
        )
        yield gauge(
            "kis_token_last_renewal_success_timestamp_seconds",
            "When a KIS token was last obtained, epoch seconds.",
            state.last_success_at,
        )
        yield gauge(
            "kis_token_last_request_timestamp_seconds",
            "When a KIS token was last requested from the broker, epoch seconds.",
            state.last_request_at,
        )
        yield from budget_metrics(info["call_budget"], gauge, labels)


def budget_metrics(budget: dict[str, Any], gauge: Any, labels: list[str]) -> Iterator[Metric]:
    """The key's call budget's families (see the module docstring), from ``check``'s object."""
    read = budget["error"] is None
    yield gauge("kis_token_call_rate_limit",
                "The broker's REST calls a second for the app key (KIS_RATE_LIMIT).", budget["rate"])
    yield gauge("kis_token_calls_last_minute",
                "REST calls the app key's budget let through in the last 60 s (all processes and hosts).",
                budget["calls_last_minute"])
    yield gauge("kis_token_egw00201_last_minute",
                "EGW00201 answers (calls a second exceeded) seen for the app key in the last 60 s.",
                budget["egw00201_last_minute"])
    total = CounterMetricFamily(
        "kis_token_egw00201", "EGW00201 answers (calls a second exceeded) seen for the app key.",
        labels=LABELS,
    )
    if read:
        total.add_metric(labels, float(budget["egw00201_total"]))
    yield total
    yield gauge("kis_token_call_budget_store_down",
                "1 if the token store does not answer and this host paces the app key alone, else 0.",
                None if not read else int(budget["store_down"]))


def render(manager: Any) -> str:
    """Prometheus text exposition (format 0.0.4) of ``manager``'s token; no broker request.

    Raises:
        ConfigError: the market is not configured (its key fingerprint is needed to read the record).
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TokenCollector(manager))
    return generate_latest(registry).decode("utf-8")


def write_textfile(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically, for node_exporter's textfile collector.

    The text goes to a hidden temp file in the same directory (not matching ``*.prom``), is
    fsynced, made mode :data:`TEXTFILE_MODE`, then renamed over ``path``: a reader sees the old
    file or the new one, never half of one. The directory is not created.

    Raises:
        StoreError: the file cannot be written (one line naming the path and the reason).
    """
    target = Path(path)
    atomic_write(target, text, TEXTFILE_MODE, what=f"metrics to {target}")
