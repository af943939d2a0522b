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


def _base_url(url: str) -> str:
    """``url`` checked (http/https with a host) and ending in ``/``."""
    from urllib.parse import urlsplit

    from edgepack.errors import UsageError

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--bundle-url {url!r}: give an http:// or https:// URL, e.g. https://cdn.example/edgepack/")
    return url if url.endswith("/") else url + "/"


@click.group()
def fleet() -> None:
    """The fleet controller: devices, telemetry, signed model updates over MQTT."""


@fleet.command()
@broker_option
@db_option
@bundles_option
@click.option("--key", "private_key", type=click.Path(exists=True, path_type=Path),
              help="the fleet's ed25519 private key: the controller signs the desired states of rollouts with it "
                   "(without it, it records and serves chunks but runs no rollout)")
@click.option("--client-id", help="MQTT client id (default: edgepack-fleet-HOSTNAME; give each controller its own)")
@click.option("--share", type=click.Choice(["none", "chunks", "all"]), default="none", show_default=True,
              help="with several controllers: what MQTT 5 shared subscriptions ($share/edgepack/…) split between them; "
                   "chunks on Mosquitto, all on brokers that skip offline members (README: several controllers)")
@click.option("--tick", "tick_s", type=click.FloatRange(0.1), default=2.0, show_default=True,
              help="seconds between rollout ticks")
@click.option("--ingest-workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="processes that store telemetry and events (MQTT 5 shared subscription between them): "
                   "one per core the controller may use")
@click.option("--keep-raw", "keep_raw", default="7d", show_default=True, help="how long raw telemetry is kept")
@click.option("--http", "http_listen", metavar="HOST:PORT",
              help="also serve the bundles over HTTP with Range requests; rollouts then name it as each bundle's source")
@click.option("--bundle-url", metavar="URL",
              help="base URL of a copy of the bundles folder (S3, a CDN, nginx): rollouts name URL<sha256>.edgepack "
                   "as the source devices download with Range requests (MQTT chunks stay the fallback)")
@click.option("--dashboard", "dashboard_listen", metavar="HOST:PORT",
              help="also serve the live fleet page (devices, rollouts, charts) and its JSON API; read-only without the token")
@click.option("--dashboard-token", envvar="EDGEPACK_DASHBOARD_TOKEN", metavar="TOKEN",
              help="bearer token the page's actions (pause, resume, abort, rollback) need "
                   "[env EDGEPACK_DASHBOARD_TOKEN; default: a random one, printed at start]")
@_auth
def serve(broker, db_url, bundles_dir, private_key, client_id, share, tick_s, ingest_workers, keep_raw, http_listen,
          bundle_url, dashboard_listen, dashboard_token, protocol, username, password, ca_file, cert_file, key_file) -> None:
    """Record device state, telemetry and events; answer bundle chunk requests; advance rollouts.
    Runs until SIGTERM (then stores and acknowledges what it received, and stops)."""
    import logging

    from edgepack.bundle.signing import load_private_key

    from .controller import FleetController
    from .rollouts import parse_duration

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    address = _broker(broker, username, password, ca_file, cert_file, key_file, protocol)
    server = None
    if bundle_url:
        bundle_url = _base_url(bundle_url)
    if http_listen:
        from .bundle_http import BundleServer, parse_listen

        server = BundleServer(bundles_dir, *parse_listen(http_listen)).start()
        bundle_url = bundle_url or server.url
        click.echo(f"bundles over HTTP on {http_listen} (sources named: {bundle_url}<sha256>.edgepack)", err=True)
    dashboard = None
    if dashboard_listen:
        from .bundle_http import parse_listen
        from .dashboard.server import DashboardServer

        dashboard = DashboardServer(db_url, *parse_listen(dashboard_listen, "--dashboard"), token=dashboard_token).start()
        shown = "as given" if dashboard_token else dashboard.token
        click.echo(f"dashboard on {dashboard.url} (actions need the token: {shown})", err=True)
    if ingest_workers > 1 and address.negotiate() != "5":
        click.echo("--ingest-workers: the broker speaks MQTT 3.1.1 only (no shared subscriptions); "
                   "one process stores telemetry", err=True)
        ingest_workers = 1
    controller = FleetController(address, db_url, bundles_dir, client_id=client_id, share=share, tick_s=tick_s,
                                 signing_key=load_private_key(private_key) if private_key else None,
                                 keep_raw_s=parse_duration(keep_raw), bundle_url=bundle_url,
                                 role="control" if ingest_workers > 1 else "all")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    workers = None
    from .ingest import IngestWorkers, worker_count

    if ingest_workers > 1 or (address.negotiate() == "5" and worker_count(db_url, controller.client_id) > 1):
        workers = IngestWorkers(address, db_url, bundles_dir, controller.client_id, ingest_workers, share).start()
        if not workers.wait_ready():
            click.echo("warning: not every ingest worker subscribed within 60 s; going on", err=True)
    click.echo(f"fleet controller {controller.client_id} on {broker} (MQTT {address.protocol}), registry {db_url}, "
               f"bundles in {bundles_dir}{', rollouts on' if private_key else ''}"
               f"{f', {ingest_workers} ingest workers' if ingest_workers > 1 else ''}", err=True)
    try:
        controller.serve(stop)
    finally:
        if workers:
            workers.stop()
        if server:
            server.stop()
        if dashboard:
            dashboard.stop()


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
@click.option("--bundle-url", metavar="URL", help="base URL of an HTTP(S) copy of the bundles folder: devices "
              "download URL<sha256>.edgepack with Range requests (MQTT chunks stay the fallback)")
@click.option("--shadow", "shadow_bundles", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="another version's bundle (one per profile; repeatable) to run in shadow beside BUNDLES: devices "
                   "mirror answered inputs to it and report how often it agrees")
@click.option("--shadow-sample-rate", type=click.FloatRange(0, 1, min_open=True), help="share of requests mirrored to the shadow")
@broker_option
@bundles_option
@db_option
@_auth
def push(bundles, device, group, private_key, desired_version, probation_s, min_runs, max_error_rate, max_latency_ratio,
         max_p95_ms, expires_s, bundle_url, shadow_bundles, shadow_sample_rate, broker, bundles_dir, db_url, protocol,
         username, password, ca_file, cert_file, key_file) -> None:
    """Sign (with the fleet key) and publish (retained) the desired state: run BUNDLES (one per profile)
    on a device or group, with the probation budget devices enforce."""
    from edgepack.bundle.signing import load_private_key
    from edgepack.errors import UsageError

    from . import topics
    from .controller import desired_for_bundles, publish_retained, read_retained_version
    from .db import desired as desired_table
    from .desired import sign_desired
    from .registry import FleetRegistry
    from .releases import BundleShelf
    from .rollouts import next_desired_version

    if bool(device) == bool(group):
        raise UsageError("give exactly one of --device or --group")
    target = topics.desired(topics.check_id("device", device)) if device else topics.group_desired(topics.check_id("group", group))
    address = _broker(broker, username, password, ca_file, cert_file, key_file, protocol)
    key = load_private_key(private_key)
    registry = FleetRegistry(db_url)
    given = desired_version
    retained = None
    budget = {"duration_s": probation_s, "min_runs": min_runs, "max_error_rate": max_error_rate,
              "max_latency_ratio": max_latency_ratio, "max_p95_ms": max_p95_ms}
    shelf = BundleShelf(bundles_dir)
    for bundle in (*bundles, *shadow_bundles):
        shelf.add(bundle)  # where 'fleet serve' finds it
    import time as _time

    from sqlalchemy.exc import IntegrityError

    for _ in range(5):
        if given is None:
            # One more than anything the fleet signed (recorded) or the topic holds (retained).
            with registry.engine.connect() as db:
                recorded = next_desired_version(db, reserve=False)
            if retained is None:
                retained = read_retained_version(address, target, f"edgepack-push-{threading.get_ident()}-read")
            desired_version = max(recorded, retained + 1)
        state = desired_for_bundles(list(bundles), device=device, group=group, version=desired_version,
                                    expires_s=expires_s, probation={k: v for k, v in budget.items() if v is not None} or None,
                                    bundle_url=_base_url(bundle_url) if bundle_url else None,
                                    shadow=list(shadow_bundles) or None, shadow_sample_rate=shadow_sample_rate)
        payload = sign_desired(state, key)
        try:
            with registry.engine.begin() as db:  # every signed desired state is on record
                db.execute(desired_table.insert().values(topic=target, desired_version=state.version,
                                                         model=state.model.name, version=state.model.version,
                                                         purpose="push", payload=payload.decode(),
                                                         created=_time.time(), expires_at=state.expires_at))
            break
        except IntegrityError:
            if given is not None:
                raise UsageError(f"desired-state version {given} is signed already; omit --desired-version "
                                 "(the next free one is taken)") from None
            # a controller signed that number meanwhile: take the next
    else:
        raise UsageError("could not record the desired state: its version kept being taken; try again")
    publish_retained(address, target, payload, f"edgepack-push-{threading.get_ident()}")
    shadow = f", shadow {state.shadow.version}" if state.shadow else ""
    click.echo(f"desired state {state.version}: {state.model.name} {state.model.version} "
               f"({', '.join(sorted(state.bundles))}){shadow} -> {target}")


@fleet.group(invoke_without_command=True)
@db_option
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def devices(ctx, db_url, as_json) -> None:
    """Devices and their last reported state (subcommands: tag, group)."""
    ctx.obj = {"db_url": db_url}
    if ctx.invoked_subcommand:
        return
    from .registry import FleetRegistry, dumps

    rows = FleetRegistry(db_url).devices()
    if as_json:
        click.echo(dumps(rows))
        return
    for row in rows:
        models = (row["state"] or {}).get("models", {})
        summary = ", ".join(f"{n} {m.get('active')} ({(m.get('update') or {}).get('state')})" for n, m in models.items())
        labels = "".join(f" #{t}" for t in row.get("tags") or []) + "".join(f" @{g}" for g in row.get("groups") or [])
        click.echo(f"{row['device']}: {'online' if row['online'] else 'offline'} {row['profile'] or ''} {summary}{labels}")


def _labeller(column: str):
    @click.argument("device_ids", nargs=-1, required=True)
    @click.option("--add", multiple=True, help=f"{column[:-1]} to add")
    @click.option("--remove", multiple=True, help=f"{column[:-1]} to remove")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_obj
    def command(obj, device_ids, add, remove, as_json) -> None:
        from edgepack.errors import UsageError

        from . import topics
        from .registry import FleetRegistry, dumps

        if not add and not remove:
            raise UsageError(f"give --add or --remove with the {column} to change")
        for value in add + remove:
            topics.check_id(column[:-1], value)
        rows = FleetRegistry(obj["db_url"]).label(column, list(device_ids), list(add), list(remove))
        if as_json:
            click.echo(dumps(rows))
            return
        for row in rows:
            click.echo(f"{row['device']}: {column} {', '.join(row[column]) or '-'}")

    command.__doc__ = f"Add or remove {column} of devices (on the controller; rollouts select by them)."
    return command


devices.command("tag")(_labeller("tags"))
devices.command("group")(_labeller("groups"))


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


# -- releases --------------------------------------------------------------------------------------

@fleet.group()
def release() -> None:
    """Releases: one model version, one signed bundle per profile."""


@release.command("add")
@click.argument("bundles", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--notes", help="what changed")
@db_option
@bundles_option
@click.option("--json", "as_json", is_flag=True)
def release_add(bundles, notes, db_url, bundles_dir, as_json) -> None:
    """Register a release from its bundles (stored by sha256 where 'fleet serve' sends them from)."""
    from .registry import FleetRegistry, dumps
    from .releases import BundleShelf, add_release

    added = add_release(FleetRegistry(db_url), BundleShelf(bundles_dir), list(bundles), notes)
    if as_json:
        click.echo(dumps(_brief_release(added)))
        return
    click.echo(f"release {added['name']}@{added['version']}: " +
               ", ".join(f"{p} {b['sha256'][:12]} ({b['size']} bytes)" for p, b in sorted(added["bundles"].items())))


def _brief_release(row: dict) -> dict:
    return {**row, "bundles": {p: {k: v for k, v in b.items() if k != "chunks"} for p, b in row["bundles"].items()}}


@release.command("list")
@db_option
@click.option("--json", "as_json", is_flag=True)
def release_list(db_url, as_json) -> None:
    """The registered releases."""
    from .registry import FleetRegistry, dumps
    from .releases import list_releases

    rows = [_brief_release(r) for r in list_releases(FleetRegistry(db_url))]
    if as_json:
        click.echo(dumps(rows))
        return
    for row in rows:
        click.echo(f"{row['name']}@{row['version']}: {', '.join(sorted(row['bundles']))}"
                   + (f" - {row['notes']}" if row.get("notes") else ""))


# -- rollouts --------------------------------------------------------------------------------------

def _selector(group, tag, device_list) -> dict:
    from edgepack.errors import UsageError

    chosen = [k for k, v in (("group", group), ("tag", tag), ("devices", device_list)) if v]
    if len(chosen) != 1:
        raise UsageError("say which devices with exactly one of --group G, --tag T or --devices A,B")
    if device_list:
        return {"devices": [d.strip() for d in device_list.split(",") if d.strip()]}
    return {"group": group} if group else {"tag": tag}


@fleet.group()
def rollout() -> None:
    """Staged rollouts of a release: start, show, pause, resume, abort."""


@rollout.command("start")
@click.argument("release_name")
@click.option("--group")
@click.option("--tag")
@click.option("--devices", "device_list", help="comma-separated device ids")
@click.option("--stages", help="cumulative stages: percentages (1%,10%,100%) or counts (5,20,100) [default 10%,100%]; "
                                "shadow:10% runs the release in shadow on those devices first, promoted by the next stage "
                                "when the shadow criteria hold over the soak")
@click.option("--soak", default="60s", show_default=True, help="how long each stage runs before the next")
@click.option("--min-devices", type=click.IntRange(1), help="devices in a stage at least")
@click.option("--rate", help="instead of stages: devices per minute (10/min)")
@click.option("--growth", type=click.FloatRange(1.0, 5.0), help="with --rate: the rate's factor after every minute")
@click.option("--device-timeout", default="30m", show_default=True,
              help="a device online this long after its offer without a result counts as failed (timed out)")
@click.option("--retries", type=click.IntRange(0, 10), default=0, show_default=True, help="offers again after a failure")
@click.option("--max-failures", "max_failure_pct", type=click.FloatRange(0, 100), default=20.0, show_default=True,
              help="abort when this percentage of the finished devices failed…")
@click.option("--min-finished", type=click.IntRange(1), default=5, show_default=True, help="…once this many finished")
@click.option("--max-latency-ratio", type=click.FloatRange(1.0, min_open=True),
              help="abort when the updated devices' p95 latency is above this x the old version's")
@click.option("--max-error-delta", type=click.FloatRange(0, 1), help="abort when the error rate rises by more than this")
@click.option("--max-drift-delta", type=click.FloatRange(0, 1), help="abort when the share of drift alarms rises by more")
@click.option("--max-prediction-psi", type=click.FloatRange(0, min_open=True),
              help="abort when the predicted classes shift (PSI, new cohort vs old) by more than this")
@click.option("--min-requests", type=click.IntRange(1), default=100, show_default=True,
              help="requests per cohort before the metric criteria judge")
@click.option("--window", default="10m", show_default=True, help="the metric criteria's window")
@click.option("--probation", help="how long each device watches the new version (its own probation)")
@click.option("--min-agreement", type=click.FloatRange(0, 1), help="shadow stage: agreement with the active version "
              "(top-1 for classes, IoU for maps, cosine for embeddings) at least this [default 0.95]")
@click.option("--min-shadow-samples", type=click.IntRange(1), help="shadow stage: samples compared before it judges [default 200]")
@click.option("--max-shadow-error-rate", type=click.FloatRange(0, 1), help="shadow stage: candidate errors / samples at most [default 0.01]")
@click.option("--max-shadow-latency-ratio", type=click.FloatRange(0, min_open=True),
              help="shadow stage: the candidate's p95 run time over the active version's p95 at most")
@click.option("--shadow-sample-rate", type=click.FloatRange(0, 1, min_open=True),
              help="shadow stage: share of answered requests mirrored to the candidate [device default 1]")
@db_option
@click.option("--json", "as_json", is_flag=True)
def rollout_start(release_name, group, tag, device_list, stages, soak, min_devices, rate, growth, device_timeout, retries,
                  max_failure_pct, min_finished, max_latency_ratio, max_error_delta, max_drift_delta, max_prediction_psi,
                  min_requests, window, probation, min_agreement, min_shadow_samples, max_shadow_error_rate,
                  max_shadow_latency_ratio, shadow_sample_rate, db_url, as_json) -> None:
    """Roll NAME@VERSION out to a group, a tag or listed devices, in stages, gated on install failures
    and on model metrics against the devices still on the old version ('fleet serve --key' runs it)."""
    from edgepack.errors import UsageError

    from . import rollouts as plans
    from .registry import FleetRegistry, dumps
    from .releases import parse_release

    if stages and rate:
        raise UsageError("give --stages or --rate, not both")
    strategy = {"soak_s": plans.parse_duration(soak), "min_devices": min_devices, "retries": retries,
                "device_timeout_s": plans.parse_duration(device_timeout)}
    if stages:
        strategy["stages"] = plans.parse_stages(stages)
    if rate:
        strategy.update(rate_per_min=plans.parse_rate(rate), growth=growth or 1.0)
    criteria = {"max_failure_pct": max_failure_pct, "min_finished": min_finished, "max_latency_ratio": max_latency_ratio,
                "max_error_delta": max_error_delta, "max_drift_delta": max_drift_delta,
                "max_prediction_psi": max_prediction_psi, "min_requests": min_requests,
                "window_s": plans.parse_duration(window),
                "probation_s": plans.parse_duration(probation) if probation else None,
                "min_agreement": min_agreement, "min_shadow_samples": min_shadow_samples,
                "max_shadow_error_rate": max_shadow_error_rate, "max_shadow_latency_ratio": max_shadow_latency_ratio}
    if shadow_sample_rate:
        strategy["shadow_sample_rate"] = shadow_sample_rate
    registry = FleetRegistry(db_url)
    name, version = parse_release(release_name)
    rollout_id = plans.start(registry, name, version, _selector(group, tag, device_list), strategy, criteria)
    (head,) = plans.summary(registry, rollout_id)
    if as_json:
        click.echo(dumps({k: v for k, v in head.items() if k != "members"}))
        return
    click.echo(f"rollout {rollout_id}: {name}@{version} to {head['devices']} devices ({_counts(head)})")


def _counts(head: dict) -> str:
    return ", ".join(f"{n} {s}" for s, n in sorted(head["counts"].items()))


@fleet.command("rollouts")
@db_option
@click.option("--json", "as_json", is_flag=True)
def rollouts_list(db_url, as_json) -> None:
    """Every rollout and fleet rollback, with its counts."""
    from .registry import FleetRegistry, dumps
    from .rollouts import summary

    heads = summary(FleetRegistry(db_url))
    if as_json:
        click.echo(dumps(heads))
        return
    for head in heads:
        what = f"{head['name']}@{head['version']}" if head["kind"] == "rollout" else f"rollback of {head['name']}"
        click.echo(f"{head['id']}: {what} {head['state']} stage {head['stage'] + 1}/{len(head['strategy'].get('stages', [1]))} "
                   f"({_counts(head)})" + (f" - {head['reason']}" if head.get("reason") else ""))


@rollout.command("show")
@click.argument("rollout_id", type=int)
@db_option
@click.option("--json", "as_json", is_flag=True)
def rollout_show(rollout_id, db_url, as_json) -> None:
    """One rollout: per stage offered, downloading, committed, failed, rolled back; the verdicts."""
    from .registry import FleetRegistry, dumps
    from .rollouts import summary

    (head,) = summary(FleetRegistry(db_url), rollout_id)
    if as_json:
        click.echo(dumps(head))
        return
    click.echo(f"rollout {head['id']} ({head['kind']}): {head['name']}@{head['version']} {head['state']}"
               + (f" - {head['reason']}" if head.get("reason") else ""))
    for stage, counts in sorted(head["stages"].items()):
        click.echo(f"  stage {stage}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    verdicts = head.get("verdicts") or {}
    if verdicts.get("failures"):
        v = verdicts["failures"]
        click.echo(f"  failures: {v['failed']}/{v['finished']} finished ({v['failure_pct']}%, limit {v['limit_pct']}%): "
                   f"{v['decision']}")
    failed = [m for m in head.get("members", []) if m["status"] in ("failed", "timed_out") and m.get("detail")]
    for m in failed[:5]:
        click.echo(f"  {m['device']} {m['status']}: {m['detail']}")
    if len(failed) > 5:
        click.echo(f"  … and {len(failed) - 5} more ('--json' lists every device)")
    for profile, v in ((verdicts.get("metrics") or {}).get("profiles") or {}).items():
        numbers = ", ".join(f"{k} {v[k]}" for k in ("latency_ratio", "error_delta", "drift_delta", "prediction_psi")
                            if v.get(k) is not None)
        click.echo(f"  metrics {profile}: {v['decision']} ({numbers or v.get('message', '')}; requests new "
                   f"{v['new']['requests']} old {v['old']['requests']})")


def _steer(action: str):
    @click.argument("rollout_id", type=int)
    @db_option
    def command(rollout_id, db_url) -> None:
        from .registry import FleetRegistry
        from .rollouts import request

        request(FleetRegistry(db_url), rollout_id, action)
        click.echo(f"rollout {rollout_id}: {action} requested (the controller acts on its next tick)")

    command.__doc__ = f"{action.capitalize()} a rollout" + (" (and roll its updated devices back)" if action == "abort" else "") + "."
    return command


for _action in ("pause", "resume", "abort"):
    rollout.command(_action)(_steer(_action))


@fleet.command("rollback")
@click.option("--group")
@click.option("--tag")
@click.option("--devices", "device_list", help="comma-separated device ids")
@click.option("--release", "release_name", help="every device on NAME@VERSION")
@click.option("--model", help="the model (when the devices run several)")
@db_option
@click.option("--json", "as_json", is_flag=True)
def rollback(group, tag, device_list, release_name, model, db_url, as_json) -> None:
    """Send devices back to the version in their other slot (no download), as a rollout of its own."""
    from edgepack.errors import UsageError

    from .registry import FleetRegistry, dumps
    from .releases import parse_release
    from .rollouts import start_rollback, summary

    registry = FleetRegistry(db_url)
    if release_name:
        if group or tag or device_list:
            raise UsageError("give --release or a device selection, not both")
        rollout_id = start_rollback(registry, model, None, parse_release(release_name))
    else:
        rollout_id = start_rollback(registry, model, _selector(group, tag, device_list))
    (head,) = summary(registry, rollout_id)
    if as_json:
        click.echo(dumps({k: v for k, v in head.items() if k != "members"}))
        return
    click.echo(f"rollback {rollout_id} of {head['name']}: {head['devices']} devices ({_counts(head)})")


def _register_simulate() -> None:
    # The simulator's command lives with the simulator (it needs the agent's code; imported lazily).
    from .simulate_cli import simulate

    fleet.add_command(simulate)


_register_simulate()
