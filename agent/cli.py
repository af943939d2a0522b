"""The device command line: ``edgepack-agent install | predict | status | rollback | reset-updates``.

Light by design: it imports the edgepack core and the agent only (never torch, onnx or converters).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import click

from edgepack import __version__
from edgepack.errors import EdgepackError

CONFIG_ENV = "EDGEPACK_AGENT_CONFIG"
store_option = click.option("--store", type=click.Path(path_type=Path), help="store folder (default: the config's, else $EDGEPACK_STORE or a per-user folder)")
key_option = click.option("--key", "keys", multiple=True, type=click.Path(path_type=Path), help="trusted public key (repeatable); bundles must be signed by one (added to the config's trusted_keys)")
config_option = click.option("--config", "config_path", type=click.Path(path_type=Path), envvar=CONFIG_ENV,
                             help=f"the daemon's agent.yaml (default ${CONFIG_ENV}): its store, trusted_keys and profile apply")


def _store(store=None, keys=(), profile=None, config_path=None, recover: bool = True):
    """The store as the daemon sees it: the config's store, keys and profile, with the options on top."""
    from edgepack.bundle.signing import load_public_key

    from .config import load_config
    from .store import ModelStore

    config = load_config(config_path) if config_path else None
    root = store or (config.store if config else None)
    key_paths = list(config.trusted_keys if config else []) + list(keys)
    store_object = ModelStore(root, [load_public_key(k) for k in key_paths] or None,
                              profile or (config.profile if config else None))
    if recover and not store_object.daemon_running():
        # Finish or undo what a crash interrupted. Never while a daemon serves the store: its update
        # in progress (a version on probation) is not a crash.
        store_object.recover()
    return store_object


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgepack-agent")
def cli() -> None:
    """Run edgepack bundles on this device, offline."""
    from .runtime.onnx_backend import allow_spinning

    # Every agent command measures and runs models as the daemon does by default, so the per-sample
    # times an install stores compare with the ones the daemon's updater stores (see SPINNING).
    allow_spinning(False)


@cli.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path), envvar=CONFIG_ENV, help=f"agent.yaml (see examples/device/agent.yaml; default ${CONFIG_ENV})")
@click.option("--bundle", "bundles", multiple=True, type=click.Path(path_type=Path), help="serve this bundle file directly (repeatable)")
@store_option
@click.option("--host", help="address to bind (default 127.0.0.1; anything else needs server.token)")
@click.option("--port", type=int, help="TCP port (default 8000; 0 picks a free one and logs it)")
@click.option("--grpc-port", type=int, help="also serve OIP v2 over gRPC on this port (0 picks a free one and logs it)")
@click.option("--token-file", type=click.Path(path_type=Path), help="file holding the bearer token")
@click.option("--shadow", "shadows", multiple=True, type=click.Path(path_type=Path),
              help="run this bundle in shadow beside the active version of its model (repeatable)")
@click.option("--split", "splits", multiple=True, metavar="BUNDLE=PERCENT",
              help="A/B: answer PERCENT of the requests of the bundle's model with it (repeatable)")
@key_option
def run(config_path, bundles, store, host, port, grpc_port, token_file, keys, shadows, splits) -> None:
    """The daemon: serve models over HTTP (Open Inference Protocol v2), and gRPC when asked, until SIGTERM."""
    from .config import add_candidate, load_config
    from .daemon import serve

    def absolute(path):
        return str(path.resolve()) if path else None

    config = load_config(config_path, {
        "store": absolute(store), "server.host": host, "server.port": port, "server.grpc_port": grpc_port,
        "server.token_file": absolute(token_file), "trusted_keys": [absolute(k) for k in keys] or None,
    })
    for path in shadows:
        add_candidate(config, "shadow", path.resolve())
    for text in splits:
        path, _, percent = text.rpartition("=")
        try:
            value = float(percent)
        except ValueError:
            value = None
        if not path or value is None:
            raise click.UsageError(f"--split {text}: give BUNDLE=PERCENT, e.g. --split v2.edgepack=20")
        add_candidate(config, "split", Path(path).resolve(), value)
    sys.exit(serve(config, [b.resolve() for b in bundles]))


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@store_option
@key_option
@click.option("--profile", help="this device's profile; bundles for another profile are refused")
@config_option
def install(bundle, store, keys, profile, config_path) -> None:
    """Verify BUNDLE, stage it in the inactive slot, smoke-test it, then make it active."""
    model_store = _store(store, keys, profile, config_path)
    state = model_store.install(bundle)
    slot = state["slots"][state["active"]]
    click.echo(f"installed {state['name']} {slot['version']} ({slot['precision']}, {slot['profile']}) in slot "
               f"{state['active']} of {model_store.root}; previous slot: {state['previous'] or 'none'}")


@cli.command()
@click.option("--input", "input_path", required=True, type=click.Path(path_type=Path), help=".npy, .npz or .jsonl")
@click.option("--output", "output_path", required=True, type=click.Path(path_type=Path), help=".npy, .npz or .jsonl")
@click.option("--bundle", type=click.Path(path_type=Path), help="score with this bundle file instead of the store")
@click.option("--model", "model_name", help="model name in the store (when it holds several)")
@store_option
@key_option
@click.option("--threads", type=int, help="intra-op threads (default: the bundle's profile)")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--integer-io", is_flag=True, help="full-int8 TFLite models: read and write raw int8 tensors, not floats")
@config_option
def predict(input_path, output_path, bundle, model_name, store, keys, threads, batch_size, integer_io, config_path) -> None:
    """Batch-score an input file offline with the active model (or --bundle)."""
    from .batch_io import read_inputs, sample_count, write_outputs
    from .loader import load_bundle

    with tempfile.TemporaryDirectory(prefix="edgepack-predict-") as temp:
        if bundle:
            trusted = _store(store, keys, config_path=config_path, recover=False).trusted_keys
            model = load_bundle(bundle, Path(temp), keys=trusted, threads=threads)
        else:
            model_store = _store(store, keys, config_path=config_path, recover=False)
            model = model_store.load_active(model_store.resolve_name(model_name), threads, smoke=True)
        try:
            if integer_io and not model.use_integer_io():
                raise click.UsageError(f"--integer-io: {model.name} has float inputs and outputs; drop the flag")
            feeds = read_inputs(input_path, model.inputs)
            outputs = model.predict(feeds, max_batch=batch_size)
            output_specs = list(model.outputs)
        finally:
            model.close()
    write_outputs(output_path, outputs, output_specs)
    count = sample_count(outputs, output_specs)
    click.echo(f"scored {count} samples with {model.name} {model.version} -> {output_path}")


@cli.command()
@store_option
@click.option("--json", "as_json", is_flag=True)
@config_option
def status(store, as_json, config_path) -> None:
    """Slots, versions, health and update state of every model in the store; the fleet link and the
    update record when a daemon with MQTT uses the store."""
    from .updates.download import read_progress
    from .updates.record import RecordCorrupt, read_record

    model_store = _store(store, config_path=config_path, recover=False)
    states = {name: model_store.state(name) for name in model_store.model_names(with_empty=True)}
    for name, state in states.items():
        for slot, info in state["slots"].items():
            info["health"] = model_store.slot_health(name, slot)
    progress = read_progress(model_store.root)
    for state in states.values():
        target = (state["update"].get("target") or {}).get("sha256")
        if state["update"]["state"] == "downloading" and target in progress:
            state["update"]["download"] = progress[target]
    fleet: dict = {}
    try:
        fleet["link"] = json.loads((model_store.root / "fleet" / "link.json").read_text())
    except (OSError, ValueError):
        pass
    try:
        record = read_record(model_store.root)
        fleet["updates"] = {"blocked": None, "accepted": record["accepted"], "failed": record["failed"]}
    except RecordCorrupt as exc:
        fleet["updates"] = {"blocked": str(exc)}
    if as_json:
        click.echo(json.dumps({"store": str(model_store.root), "models": states, "fleet": fleet}, indent=2))
        return
    if not states:
        click.echo(f"store {model_store.root}: no models installed")
    for name, state in states.items():
        update = state["update"]
        last = f", last update {update['result']}" + (f" ({update['reason']})" if update.get("reason") else "") if update.get("result") else ""
        download = update.get("download")
        doing = f" {download['percent']}% ({download['chunks']}/{download['total_chunks']} chunks)" if download else ""
        click.echo(f"{name}: active slot {state['active'] or 'none'}, previous {state['previous'] or 'none'}, "
                   f"update {update['state']}{doing}{last}")
        if state.get("local"):
            click.echo(f"  held by a local {state['local']['action']}: the fleet's desired state applies again "
                       "when it sends a newer one")
        for slot, info in sorted(state["slots"].items()):
            marker = "*" if slot == state["active"] else " "
            click.echo(f"  {marker} {slot}: {info['version']} {info['precision']} for {info['profile']} ({info['health']})")
    link = fleet.get("link")
    if link:
        how = f"connected (MQTT {link.get('protocol')})" if link.get("connected") else \
            f"not connected after {link.get('attempts')} attempts: {link.get('last_error') or 'connecting'}"
        click.echo(f"fleet link to {link.get('broker')}: {how}")
    if (fleet.get("updates") or {}).get("blocked"):
        click.echo(f"updates refused: {fleet['updates']['blocked']}")


@cli.command("reset-updates")
@store_option
@config_option
def reset_updates(store, config_path) -> None:
    """Start a new update record after a damaged one blocked updates (the damaged file is kept beside
    it). The per-model counters are seeded from the store's state files, so replays of what was
    accepted there stay refused; a running daemon picks the new record up by itself."""
    from .updates.record import reset_record

    model_store = _store(store, config_path=config_path, recover=False)
    states = {name: model_store.state(name) for name in model_store.model_names(with_empty=True)}
    with model_store.locked():
        moved = reset_record(model_store.root, states)
    click.echo(f"update record reset in {model_store.root / 'fleet'}" + (f" (the old one is {moved})" if moved else ""))


@cli.command()
@store_option
@click.option("--model", "model_name", help="model name (when the store holds several)")
@key_option
@config_option
def rollback(store, model_name, keys, config_path) -> None:
    """Switch back to the previously active version (after loading and smoke-testing it)."""
    model_store = _store(store, keys, config_path=config_path)
    name = model_store.resolve_name(model_name)
    state = model_store.rollback(name)
    click.echo(f"rolled {name} back to {state['slots'][state['active']]['version']} (slot {state['active']})")


def main() -> None:
    """Console-script entry point: one ``error:`` line and the error's exit code on failure."""
    try:
        cli.main(standalone_mode=False)
    except EdgepackError as exc:
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort):
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
