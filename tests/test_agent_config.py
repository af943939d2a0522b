"""agent.yaml validation: every error names its key; the shipped sample config and unit are valid."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent


def _write(tmp_path, text):
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    return path


def test_defaults_and_empty_file(tmp_path):
    config = load_config(_write(tmp_path, ""))
    assert config.server.host == "127.0.0.1" and config.server.port == 8000
    assert config.model("anything").batching.enabled


def test_every_error_is_named_by_key(tmp_path):
    path = _write(tmp_path, "server:\n  port: 70000\n  colour: red\nmodels:\n  - name: a\n    batching: {max_batch_size: 0}\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = error.value.message
    for key in ("server.port", "server.colour", "models.0.batching.max_batch_size"):
        assert key in message, message
    assert "\n" not in message


def test_exposed_host_needs_a_token(tmp_path):
    with pytest.raises(ConfigError, match="not a loopback address: set token or token_file"):
        load_config(_write(tmp_path, "server: {host: 0.0.0.0}\n"))
    (tmp_path / "tok").write_text("short\n")
    with pytest.raises(ConfigError, match="shorter than 16"):
        load_config(_write(tmp_path, "server: {host: 0.0.0.0, token_file: tok}\n"))
    (tmp_path / "tok").write_text("a-long-enough-token\n")
    config = load_config(_write(tmp_path, "server: {host: 0.0.0.0, token_file: tok}\n"))
    assert config.server.bearer_token() == "a-long-enough-token"
    assert config.server.token_file == tmp_path / "tok"  # relative to the config file


def test_syntax_errors_and_duplicates(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "server: [\n"))
    with pytest.raises(ConfigError, match="listed more than once"):
        load_config(_write(tmp_path, "models: [{name: a}, {name: a}]\n"))
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="tls_cert and tls_key go together"):
        load_config(_write(tmp_path, "server: {tls_cert: c.pem}\n"))


def test_overrides_win(tmp_path):
    config = load_config(_write(tmp_path, "server: {port: 9000}\n"), {"server.port": 9100, "server.host": None})
    assert config.server.port == 9100 and config.server.host == "127.0.0.1"


def test_sample_config_and_systemd_unit():
    config = load_config(ROOT / "examples/device/agent.yaml")
    assert config.model("digits").batching.max_batch_size == 8
    unit = (ROOT / "examples/device/edgepack-agent.service").read_text()
    sections = [line for line in unit.splitlines() if line.startswith("[")]
    assert sections == ["[Unit]", "[Service]", "[Install]"]
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert exec_start.split()[1:3] == ["run", "--config"]
    assert "KillSignal=SIGTERM" in unit


def test_grpc_needs_a_port_of_its_own(tmp_path):
    with pytest.raises(ConfigError, match="grpc_port and port are both 8000: give gRPC a port of its own"):
        load_config(_write(tmp_path, "server:\n  port: 8000\n  grpc_port: 8000\n"))
    assert load_config(_write(tmp_path, "server:\n  port: 0\n  grpc_port: 0\n")).server.grpc_port == 0  # both picked
    assert load_config(_write(tmp_path, "server:\n  grpc_port: 8001\n")).server.grpc_port == 8001
