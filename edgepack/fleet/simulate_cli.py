"""``edgepack fleet simulate``: N simulated agents for tests and benchmarks (see :mod:`.simulator`)."""

from __future__ import annotations

from pathlib import Path

import click


def _listed(values) -> list[str]:
    """Repeatable options that also take comma lists: ``--profile a,b --profile c`` -> a, b, c."""
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


@click.command()
@click.argument("count", type=click.IntRange(1, 100_000))
@click.option("--broker", default="mqtt://127.0.0.1:1883", show_default=True,
              help="mqtt://HOST[:PORT] or mqtts://HOST[:PORT] (TLS)")
@click.option("--protocol", type=click.Choice(["auto", "5", "3.1.1"]), default="auto", show_default=True,
              help="MQTT version of every device; auto: 5, else 3.1.1")
@click.option("--username")
@click.option("--password")
@click.option("--ca", "ca_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CA certificate of the broker")
@click.option("--profile", "profiles", multiple=True, required=True,
              help="device profile(s), assigned round-robin: --profile x86-64,rpi4 (repeatable)")
@click.option("--key", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="public key every device trusts: bundles (build key) and, without --fleet-key, desired states")
@click.option("--fleet-key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="public key desired states are signed with (default: --key)")
@click.option("--install", "installs", multiple=True, required=True,
              help="the bundle every device starts on, one per profile (repeatable or comma list); a store that "
                   "has the model already keeps what it has")
@click.option("--store-root", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="each device's store (slots, spool, update record) is <store-root>/<device id>")
@click.option("--prefix", default="sim", show_default=True, help="device ids are PREFIX-0001, PREFIX-0002, …")
@click.option("--group", "groups", multiple=True, help="every device follows this group's desired state (repeatable)")
@click.option("--interval", "--telemetry-interval", "interval_s", type=click.FloatRange(0.1), default=2.0,
              show_default=True, help="seconds between telemetry messages of each device")
@click.option("--rate", type=click.FloatRange(0), default=5.0, show_default=True,
              help="scripted requests per second per device")
@click.option("--tick", "tick_s", type=click.FloatRange(0.05, 10), default=0.5, show_default=True,
              help="seconds between rounds of scripted requests")
@click.option("--metrics", multiple=True, metavar="VERSION:KEY=VALUE,…",
              help="scripted serving of a release, e.g. 1.1.0:latency_ms=30,error_rate=0.05,classes=0.2/0.3/0.5 "
                   "(also latency_sigma, the lognormal's shape; classes as weights of labels 0,1,2… or "
                   "cat:0.2/dog:0.8). 'default:…' sets what unnamed versions do; the defaults are latency_ms=10, "
                   "latency_sigma=0.3, error_rate=0, three classes equally likely. Repeatable")
@click.option("--fail-install", multiple=True, metavar="VERSION:SPEC",
              help="VERSION fails to load on these devices (the updater rolls back and reports it). SPEC: a "
                   "fraction (0.2: the first 20% of the devices), all, or ids joined by '+' (sim-0001+sim-0007). "
                   "Repeatable")
@click.option("--offline", multiple=True, metavar="SPEC:START_S:DURATION_S",
              help="these devices lose the network START_S seconds after they started, for DURATION_S (they "
                   "keep serving and spooling telemetry). Repeatable")
@click.option("--crash-download", multiple=True, metavar="SPEC",
              help="these devices crash the first time a download passes 50%, then boot again from their "
                   "store and resume it. Repeatable")
@click.option("--probation-s", type=click.FloatRange(0), default=2.0, show_default=True,
              help="seconds a new version is watched before it commits (a signed budget overrides it)")
@click.option("--min-runs", type=click.IntRange(1), default=5, show_default=True,
              help="requests before the probation judges error rate and latency")
@click.option("--chunk-timeout-s", type=click.FloatRange(0.1), default=2.0, show_default=True,
              help="a requested chunk not received by then is asked again")
@click.option("--download-window", type=click.IntRange(1, 64), help="chunks each device asks for at once (default: the agent's)")
@click.option("--reboot-s", type=click.FloatRange(0), default=1.0, show_default=True,
              help="seconds a crashed device stays down")
@click.option("--duration", "duration_s", type=click.FloatRange(0), help="stop after this many seconds (default: at SIGTERM/SIGINT)")
@click.option("--status", type=click.Path(dir_okay=False, path_type=Path),
              help="JSON file rewritten about once a second: every device's profile, active version, update "
                   "state and link; 'ready' counts the connected ones")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the scripted traffic")
@click.option("--disk-threads", type=click.IntRange(1, 256), default=8, show_default=True,
              help="threads all devices share for installs, downloads and staging")
@click.option("--spool-sync", type=click.Choice(["full", "normal", "off"]), default="full", show_default=True,
              help="SQLite synchronous mode of the telemetry spools (full: the agent's; normal: no fsync per message)")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="warning",
              show_default=True, help="the agents' JSON logs on stderr, each with its device id")
def simulate(count, broker, protocol, username, password, ca_file, profiles, key, fleet_key, installs, store_root,
             prefix, groups, interval_s, rate, tick_s, metrics, fail_install, offline, crash_download, probation_s,
             min_runs, chunk_timeout_s, download_window, reboot_s, duration_s, status, seed, disk_threads, spool_sync,
             log_level) -> None:
    """COUNT simulated agents in this process: real MQTT clients with their own ids, spools and model stores,
    downloading, verifying and installing real bundles through the agent's update code; inference metrics
    scripted per release and faults per device. Prints one line once every device is connected; stops
    cleanly on SIGTERM/SIGINT."""
    import importlib

    try:
        for module in ("agent.fleet.link", "agent.serving.metrics", "paho.mqtt.client", "onnxruntime"):
            importlib.import_module(module)
        from .simulator import Options, simulate as run
    except ImportError as exc:
        raise click.UsageError(f"the simulator runs the agent's code, which is not installed here ({exc}); "
                               "install edgepack[agent]") from None

    install_paths = [Path(p) for p in _listed(installs)]
    for path in install_paths:
        if not path.is_file():
            raise click.BadParameter(f"{path} is not a file", param_hint="--install")
    options = Options(
        count=count, broker=broker, profiles=_listed(profiles), key=key.resolve(), installs=install_paths,
        store_root=store_root.resolve(), fleet_key=fleet_key.resolve() if fleet_key else None, prefix=prefix,
        groups=_listed(groups), protocol=protocol, username=username, password=password,
        ca_file=ca_file.resolve() if ca_file else None, interval_s=interval_s, rate=rate, tick_s=tick_s,
        metrics=list(metrics), fail_install=list(fail_install), offline=list(offline),
        crash_download=list(crash_download), probation_s=probation_s, min_runs=min_runs,
        chunk_timeout_s=chunk_timeout_s, download_window=download_window, reboot_s=reboot_s,
        duration_s=duration_s, status=status.resolve() if status else None, seed=seed, disk_threads=disk_threads,
        spool_sync=spool_sync, log_level=log_level)
    raise SystemExit(run(options))
