"""The host command line: ``edgepack convert | inspect | verify | keys | sign | bench | profiles``.

Heavy modules (converters, torch, onnx, onnxruntime) are imported inside the commands that need them,
so ``edgepack --help`` stays fast. Every ``EdgepackError`` becomes one ``error:`` line and its exit code.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from . import __version__
from .errors import EdgepackError


def _fail(exc: EdgepackError) -> None:
    click.echo(f"error: {exc.message}", err=True)
    sys.exit(exc.exit_code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgepack")
def cli() -> None:
    """Convert, quantize, check, sign and inspect models for edge devices."""


@cli.command()
@click.argument("model")
@click.option("--profile", "profiles", multiple=True, required=True, help="device profile (repeatable)")
@click.option("--calibration", help="calibration data: .npy, .npz or an image folder")
@click.option("--validation", help="validation data (default: the calibration data); .npz may hold 'labels'")
@click.option("--input-shape", "input_shapes", multiple=True, help="NAME=D1,D2,... (repeatable)")
@click.option("--batch-axis", "batch_axes", multiple=True,
              help="NAME=AXIS: the axis of input NAME that holds samples (e.g. state=1), or NAME=none for a "
                   "per-request constant (default: from the graph)")
@click.option("--constant", "constants", multiple=True,
              help="NAME=VALUE: a constant input's value (e.g. sr=16000), used for data that lacks it and "
                   "recorded as the default a request may leave out")
@click.option("--state", "state", multiple=True,
              help="OUTPUT=INPUT: OUTPUT feeds INPUT on the next call (a stateful model, judged on sequences; "
                   "default: detected)")
@click.option("--name", help="model name (default: from MODEL)")
@click.option("--version", "version", default="1.0.0", show_default=True, help="semantic version of the bundle")
@click.option("--out", default="out", show_default=True, type=click.Path(path_type=Path), help="output folder")
@click.option("--min-agreement", type=click.FloatRange(0, 1), help="top-1 agreement budget (default: the profile's)")
@click.option("--min-confident-agreement", type=click.FloatRange(0, 1),
              help="top-1 agreement budget on the samples the original is confident about (default: the profile's)")
@click.option("--confident-margin", type=click.FloatRange(0), help="how far (in logits) the original's top-1 must beat "
              "its top-2 for a sample to count as confident (default: the profile's, 1.0)")
@click.option("--output-kind", "output_kinds", multiple=True, help="NAME=classes|embedding|regression|labels|map|other: "
              "what an output is, which decides how the gate judges it (default: detected)")
@click.option("--recipe", "recipes", multiple=True, help="recipes to try, in order (overrides the profile's list)")
@click.option("--try-all", is_flag=True, help="evaluate every recipe, not only up to the first that passes")
@click.option("--key", "signing_key", type=click.Path(path_type=Path), help="ed25519 private key to sign the bundles")
@click.option("--resize", help="image data: H,W (default: the model's input size)")
@click.option("--mean", help="image data: per-channel mean after scaling, e.g. 0.485,0.456,0.406")
@click.option("--std", help="image data: per-channel std, e.g. 0.229,0.224,0.225")
@click.option("--scale", type=float, default=255.0, show_default=True, help="image data: pixels are divided by this")
@click.option("--layout", type=click.Choice(["nchw", "nhwc"]), default="nchw", show_default=True)
@click.option("--color", type=click.Choice(["rgb", "gray"]), default="rgb", show_default=True)
@click.option("--reference", help="for a .tflite MODEL: the original model it was made from (the accuracy gate compares with it)")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def convert(model, profiles, calibration, validation, input_shapes, batch_axes, constants, state, name, version, out, min_agreement,
            min_confident_agreement, confident_margin, output_kinds, recipes, try_all, signing_key, resize, mean, std,
            scale, layout, color, reference, as_json) -> None:
    """Export, quantize and check MODEL; write one bundle per --profile into --out."""
    from rich.console import Console

    from converters.data import ImagePreprocessing, parse_floats
    from converters.pipeline import ConvertOptions, convert as run_convert
    from converters.report import render_json, render_tables
    from converters.layout import parse_batch_axes, parse_constants, parse_state
    from converters.sources import parse_input_shapes

    size = parse_floats(resize, "--resize")
    if size is not None and len(size) != 2:
        raise click.BadParameter("use H,W", param_hint="--resize")
    image = ImagePreprocessing(
        size=tuple(int(v) for v in size) if size else None,
        mean=parse_floats(mean, "--mean") or (0.0,), std=parse_floats(std, "--std") or (1.0,),
        scale=scale, layout=layout, color=color,
    )
    options = ConvertOptions(
        model=model, profiles=list(profiles), out=out, calibration=calibration, validation=validation,
        input_shapes=parse_input_shapes(input_shapes), name=name, version=version, min_agreement=min_agreement,
        recipes=list(recipes) or None, image=image, signing_key=signing_key, try_all=try_all, reference=reference,
        budget_overrides={key: value for key, value in (("min_confident_agreement", min_confident_agreement),
                                                        ("confident_margin", confident_margin)) if value is not None},
        output_kinds=_pairs(output_kinds, "--output-kind"),
        batch_axes=parse_batch_axes(batch_axes), constants=parse_constants(constants), state=parse_state(state),
    )
    console = Console(stderr=True)
    with console.status("converting") as status:
        results = run_convert(options, progress=lambda message: status.update(message))
    if as_json:
        click.echo(render_json(results))
    else:
        render_tables(results, Console(width=None if sys.stdout.isatty() else 200))
    failed = [r for r in results if r.bundle is None]
    for result in failed:
        click.echo(f"error: {result.error}", err=True)
    sys.exit(1 if failed else 0)


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--key", type=click.Path(path_type=Path), help="trusted public key to check the signature with")
@click.option("--json", "as_json", is_flag=True)
def inspect(bundle, key, as_json) -> None:
    """Show a bundle's manifest, files, signatures and metrics."""
    from .bundle import open_bundle
    from .bundle.signing import load_public_key

    keys = [load_public_key(key)] if key else None
    with open_bundle(bundle, public_keys=keys) as opened:
        manifest = opened.manifest
        signers = [s.get("key_id") for s in (opened.signatures or {}).get("signatures", [])]
        if as_json:
            click.echo(json.dumps({"manifest": manifest, "signatures": signers, "verified_by": opened.signed_by}, indent=2))
            return
        click.echo(f"{manifest['name']} {manifest['version']} for {manifest['profile']}: {manifest['format']} "
                   f"{manifest['precision']} on {manifest['runtime']['name']} >= {manifest['runtime']['min_version']}")
        click.echo(f"  created {manifest.get('created')}  recipe {manifest.get('recipe', {}).get('name')}  "
                   f"source {manifest.get('source', {}).get('kind')} {manifest.get('source', {}).get('sha256', '')[:12]}")
        for label, key_name in (("input", "inputs"), ("output", "outputs")):
            for spec in manifest[key_name]:
                dims = ",".join("?" if d is None else str(d) for d in spec["shape"])
                click.echo(f"  {label:6} {spec['name']}: {spec['dtype']}[{dims}]")
        metrics = manifest.get("metrics", {})
        latency = manifest.get("host_latency", {})
        click.echo(f"  agreement {metrics.get('agreement', '-')}  host p50 {latency.get('p50_ms', '-')} ms "
                   f"(fp32 {latency.get('fp32_p50_ms', '-')} ms)")
        for name, entry in sorted(manifest["files"].items()):
            click.echo(f"  file   {name}  {entry['size']} bytes  sha256 {entry['sha256'][:16]}")
        click.echo(f"  signatures: {', '.join(signers) or 'none'}" + (f" (verified: {', '.join(opened.signed_by)})" if key else ""))


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--key", type=click.Path(path_type=Path), help="trusted public key; the bundle must be signed by it")
def verify(bundle, key) -> None:
    """Check a bundle's integrity (and signature with --key); exit 0 only if valid."""
    from .bundle import open_bundle
    from .bundle.signing import load_public_key

    keys = [load_public_key(key)] if key else None
    with open_bundle(bundle, public_keys=keys, verify_files=True) as opened:
        suffix = f", signed by {', '.join(opened.signed_by)}" if opened.signed_by else (", signature not checked (no --key)" if opened.signatures else ", unsigned")
        click.echo(f"ok: {bundle} ({opened.name} {opened.version} for {opened.profile}, {len(opened.manifest['files'])} files verified{suffix})")


@cli.group()
def keys() -> None:
    """ed25519 signing keys."""


@keys.command("generate")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="folder for the key pair")
def keys_generate(out) -> None:
    """Create a signing key pair in --out."""
    from .bundle.signing import generate_keys, key_id, load_public_key

    private, public = generate_keys(out)
    click.echo(f"private key {private} (keep secret), public key {public}, key id {key_id(load_public_key(public))}")


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--key", required=True, type=click.Path(path_type=Path), help="ed25519 private key")
def sign(bundle, key) -> None:
    """Sign BUNDLE with an ed25519 private key (the bundle is verified first)."""
    from .bundle.sign import sign_bundle

    click.echo(f"signed {bundle} with key {sign_bundle(bundle, key)}")


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--seconds", type=float, default=3.0, show_default=True, help="time to spend per measurement")
@click.option("--threads", type=int, help="intra-op threads (default: the bundle's profile)")
@click.option("--json", "as_json", is_flag=True)
def bench(bundle, seconds, threads, as_json) -> None:
    """Latency p50/p95/p99, throughput and peak memory of BUNDLE on this machine."""
    from agent.bench import bench_bundle

    result = bench_bundle(bundle, seconds=seconds, threads=threads)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"{result['name']} {result['version']} ({result['profile']}, {result['precision']}) on {result['machine']}, "
               f"{result['threads']} threads")
    for row in result["batches"]:
        click.echo(f"  batch {row['batch']:3}: p50 {row['p50_ms']:.3f} ms  p95 {row['p95_ms']:.3f} ms  "
                   f"p99 {row['p99_ms']:.3f} ms  {row['samples_per_s']:.1f} samples/s")
    click.echo(f"  load {result['load_ms']:.1f} ms, peak RSS {result['peak_rss_mb']:.1f} MiB "
               f"(+{result['model_rss_mb']:.1f} MiB for the model)")


@cli.group()
def profiles() -> None:
    """Device profiles."""


@profiles.command("list")
def profiles_list() -> None:
    """List the device profiles."""
    from .profiles import list_profiles

    for name, profile in list_profiles().items():
        recipes = ", ".join(r.name for r in profile.recipes)
        click.echo(f"{name:18} {profile.arch:8} {profile.description}\n{'':18} recipes: {recipes}")


@profiles.command("show")
@click.argument("name")
def profiles_show(name) -> None:
    """Show one profile as YAML."""
    import yaml

    from .profiles import get_profile

    click.echo(yaml.safe_dump(get_profile(name).model_dump(mode="json"), sort_keys=False))


def _pairs(values, option: str) -> dict[str, str]:
    """NAME=VALUE options as a dict."""
    pairs = {}
    for value in values:
        name, sep, kind = (part.strip() for part in value.partition("="))
        if not sep or not name or not kind:
            raise click.BadParameter(f"{value!r}: use NAME=VALUE", param_hint=option)
        if name in pairs:
            raise click.BadParameter(f"{name} is given twice", param_hint=option)
        pairs[name] = kind
    return pairs


def _fleet_group():
    from .fleet.cli import fleet

    return fleet


cli.add_command(_fleet_group(), "fleet")


def main() -> None:
    """Console-script entry point."""
    try:
        cli.main(standalone_mode=False)
    except EdgepackError as exc:
        _fail(exc)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
