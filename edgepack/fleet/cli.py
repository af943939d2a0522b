"""``edgepack fleet``: serve the fleet controller, push signed desired states, look at devices/events."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import click

broker_option = click.option("--broker", default="mqtt://127.0.0.1:1883", show_default=True,
                             help="mqtt://HOST[:PORT] or mqtts://HOST[:PORT] (TLS)")
db_option = click.option("--db", "db_url", default="sqlite:///fleet.db", show_default=True,
                         help="SQLAlchemy URL of the fleet registry (SQLite file, or postgresql://…)")
bundles_option = click.option("--bundles", "bundles_dir", default="fleet-bundles", show_default=True,
                              type=click.Path(path_type=Path), help="folder of the bundles the controller serves")


def _auth(function):
    for option in (click.option("--protocol", type=click.Choice(["auto", "5", "3.1.1"]), default="auto", show_default=True,
                                help="MQTT version; auto: 5, else 3.1.1 (brokers without MQTT 5)"),
                   click.option("--username"), click.option("--password"),
                   click.option("--ca", "ca_file", type=click.Path(exists=True), help="CA certificate of the broker"),
                   click.option("--cert", "cert_file", type=click.Path(exists=True), help="client certificate"),
                   click.option("--tls-key", "key_file", type=click.Path(exists=True), help="client certificate key")):
        function = option(function)
    return function


def _broker(url, username, password, ca_file, cert_file, key_file, protocol="auto"):
    from .controller import Broker

    return Broker.from_url(url, username=username, password=password, ca_file=ca_file, cert_file=cert_file,
                           key_file=key_file, protocol=protocol)


@click.group()
def fleet() -> None:
    """The fleet controller: devices, telemetry, signed model updates over MQTT."""


@fleet.command()
@broker_option
@db_option
@bundles_option
@_auth
def serve(broker, db_url, bundles_dir, protocol, username, password, ca_file, cert_file, key_file) -> None:
    """Record device state, telemetry and events; answer bundle chunk requests. Runs until SIGTERM."""
    import logging

    from .controller import FleetController

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    address = _broker(broker, username, password, ca_file, cert_file, key_file, protocol)
    controller = FleetController(address, db_url, bundles_dir)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    click.echo(f"fleet controller on {broker} (MQTT {address.protocol}), registry {db_url}, bundles in {bundles_dir}",
               err=True)
    controller.serve(stop)


@fleet.command()
@click.argument("bundles", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--device", help="the device to update")
@click.option("--group", help="the group to update (devices list it in updates.groups)")
@click.option("--key", "private_key", required=True, type=click.Path(exists=True, path_type=Path),
              help="ed25519 private key; devices must trust its public key")
@click.option("--desired-version", type=click.IntRange(1),
              help="desired-state version (default: one more than the one retained on the topic; must grow)")
@click.option("--probation", "probation_s", type=click.FloatRange(0), help="seconds devices watch the new version")
@click.option("--min-runs", type=click.IntRange(1), help="runs before rates are judged")
@click.option("--max-error-rate", type=click.FloatRange(0, 1), help="failed runs above the old version's rate")
@click.option("--max-latency-ratio", type=click.FloatRange(1, min_open=True),
              help="roll back when the new version is slower than this x the old (default: no limit)")
@click.option("--max-p95-ms", type=click.FloatRange(0, min_open=True), help="roll back above this p95 run time")
@click.option("--expires", "expires_s", type=click.FloatRange(1), default=7 * 86400, show_default=True,
              help="seconds until the desired state expires")
@broker_option
@bundles_option
@_auth
def push(bundles, device, group, private_key, desired_version, probation_s, min_runs, max_error_rate, max_latency_ratio,
         max_p95_ms, expires_s, broker, bundles_dir, protocol, username, password, ca_file, cert_file, key_file) -> None:
    """Sign (with the fleet key) and publish (retained) the desired state: run BUNDLES (one per profile)
    on a device or group, with the probation budget devices enforce."""
    from edgepack.bundle.signing import load_private_key
    from edgepack.errors import UsageError

    from . import topics
    from .controller import BundleShelf, desired_for_bundles, publish_retained, read_retained_version
    from .desired import sign_desired

    if bool(device) == bool(group):
        raise UsageError("give exactly one of --device or --group")
    target = topics.desired(topics.check_id("device", device)) if device else topics.group_desired(topics.check_id("group", group))
    address = _broker(broker, username, password, ca_file, cert_file, key_file, protocol)
    key = load_private_key(private_key)
    if desired_version is None:
        desired_version = read_retained_version(address, target, f"edgepack-push-{threading.get_ident()}-read") + 1
    budget = {"duration_s": probation_s, "min_runs": min_runs, "max_error_rate": max_error_rate,
              "max_latency_ratio": max_latency_ratio, "max_p95_ms": max_p95_ms}
    state = desired_for_bundles(list(bundles), device=device, group=group, version=desired_version, expires_s=expires_s,
                                probation={k: v for k, v in budget.items() if v is not None} or None)
    shelf = BundleShelf(bundles_dir)
    for bundle in bundles:
        shelf.add(bundle)  # where 'fleet serve' finds it
    payload = sign_desired(state, key)
    publish_retained(address, target, payload, f"edgepack-push-{threading.get_ident()}")
    click.echo(f"desired state {state.version}: {state.model.name} {state.model.version} "
               f"({', '.join(sorted(state.bundles))}) -> {target}")


@fleet.command()
@db_option
@click.option("--json", "as_json", is_flag=True)
def devices(db_url, as_json) -> None:
    """Devices and their last reported state."""
    from .registry import FleetRegistry, dumps

    rows = FleetRegistry(db_url).devices()
    if as_json:
        click.echo(dumps(rows))
        return
    for row in rows:
        models = (row["state"] or {}).get("models", {})
        summary = ", ".join(f"{n} {m.get('active')} ({(m.get('update') or {}).get('state')})" for n, m in models.items())
        click.echo(f"{row['device']}: {'online' if row['online'] else 'offline'} {row['profile'] or ''} {summary}")


@fleet.command()
@db_option
@click.option("--device")
@click.option("--kind", type=click.Choice(["event", "telemetry"]), default="event", show_default=True)
@click.option("--limit", type=int, default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def events(db_url, device, kind, limit, as_json) -> None:
    """Events (or telemetry) the devices sent, oldest first, each once."""
    from .registry import FleetRegistry, dumps

    rows = FleetRegistry(db_url).messages(device, kind, limit)
    if as_json:
        click.echo(dumps(rows))
        return
    for row in rows:
        body = row["body"] or {}
        detail = {k: v for k, v in body.items() if k not in ("schema", "kind", "device", "boot", "seq", "ts", "event")}
        click.echo(f"{row['device']} #{row['seq']} {row['event'] or row['kind']}: {json.dumps(detail, default=str)[:200]}")
