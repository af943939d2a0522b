"""The agent daemon's configuration file (``agent.yaml``), validated with every error named by its key.

A minimal config is empty: the daemon then serves every model in the default store on
127.0.0.1:8000. See ``examples/device/agent.yaml`` for a documented sample.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgepack.errors import EdgepackError, UsageError, first_line
from edgepack.profiles import validation_problems


class ConfigError(UsageError):
    """The agent config file is missing, unreadable or invalid."""


def is_loopback(host: str) -> bool:
    """True for localhost and loopback IP addresses."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Batching(_Strict):
    """Dynamic batching of concurrent requests for one model (as Triton's dynamic batcher)."""

    enabled: bool = Field(True, description="merge concurrent requests when the model has a batch dimension")
    max_batch_size: int = Field(8, ge=1, le=4096)
    max_queue_delay_ms: float = Field(
        0.0, ge=0, le=10_000,
        description="how long the first request of a batch may wait for more; 0 batches only what queued "
        "up while the model was busy (no added latency at low load)",
    )


class ShadowConfig(_Strict):
    """A candidate version that sees the active version's inputs off the request path and is compared
    with it (agreement, latency, errors); it never answers a request."""

    bundle: Path = Field(description="the candidate's bundle file (same model name and inputs as the active one)")
    sample_rate: float = Field(1.0, gt=0, le=1, description="share of answered requests mirrored to the candidate")
    queue: int = Field(4, ge=1, le=1024, description="mirrored requests that may wait; more are dropped "
                       "(shadow work is dropped, never an answer delayed)")
    cpu_share: float = Field(0.25, gt=0, le=1, description="most of one core the candidate may use: it runs on "
                             "one low-priority thread (one intra-op thread), and after a run taking t seconds of "
                             "CPU it rests t * (1 / cpu_share - 1)")
    timeout_s: float = Field(10.0, gt=0, le=3600, description="a candidate run longer than this is hung: "
                             "nothing more is mirrored until it returns")
    max_samples: int = Field(64, ge=1, le=100_000, description="larger requests are not mirrored")
    confident_margin: float = Field(1.0, ge=0, description="class scores: top-1 beats top-2 by this (logits) "
                                    "for a sample to count as confident, as in the accuracy gate")


class SplitConfig(_Strict):
    """A/B: a share of requests answered by a second version, sticky per client id."""

    bundle: Path = Field(description="the B version's bundle file (same model name and inputs as the active one)")
    percent: float = Field(gt=0, lt=100, description="share of requests (of client ids, when requests carry "
                           "one) that the B version answers")


class ModelConfig(_Strict):
    """Serving options of one model; ``name`` is the bundle's name (the OIP model name)."""

    name: str = Field(min_length=1)
    bundle: Path | None = Field(None, description="serve this bundle file directly instead of the store")
    threads: int | None = Field(None, ge=1, le=256, description="intra-op threads (default: the bundle's profile)")
    instances: int = Field(1, ge=1, le=64, description="batches run in parallel on this many workers (LiteRT: one interpreter each)")
    batching: Batching = Field(default_factory=Batching)
    nonfinite_inputs: Literal["reject", "allow"] = "reject"
    max_queue_size: int | None = Field(
        None, ge=1, le=1_000_000,
        description="requests that may wait for this model; more are answered 503 with Retry-After "
        "(default: what the model gets through in queue_budget_ms, or in deadline_ms when that is longer, at the "
        "speed of its recent runs: a closed loop of clients the model serves within that time is never refused)")
    queue_budget_ms: float = Field(
        25.0, gt=0, le=60_000, description="sizes the default max_queue_size: the queue holds about this much "
        "work, and at least 32 requests and one full batch per instance (so on a model slower than ~0.8 ms a "
        "sample, a closed loop of 32 clients waits up to 32 samples' time); under an overload it sheds to shed_queue_ms")
    shed_queue_ms: float | None = Field(
        2.0, gt=0, le=60_000, description="while the default queue is overloaded (its requests and the refused "
        "clients held back by server.refusal_delay_ms are more than it holds: an unpaced flood), it admits only "
        "about this much work, at least one request per instance, so an admitted request waits for about one run "
        "instead of a whole queue (benchmarks/overload.py); a closed loop the full queue holds is never refused, "
        "so it never sheds; null: keep the full queue")
    place_hold_ms: float = Field(
        500.0, gt=0, le=3_600_000, description="a request admitted from its head holds a queue place while its "
        "body arrives, for at most this long; a slower upload is checked again when it queues, so slow "
        "clients cannot hold the queue shut")
    deadline_ms: float | None = Field(
        None, gt=0, le=3_600_000,
        description="default per-request deadline: queued work older than this is dropped with 504 "
        "(a request's parameters.timeout, in microseconds as Triton's, may ask for less)")
    max_samples_per_request: int = Field(
        1024, ge=1, le=10_000_000, description="more samples in one request are refused with 413")
    stream: bool = Field(False, description="take requests over MQTT on .../stream/{model}/in, answer on .../out")
    stream_max_in_flight: int = Field(16, ge=1, le=10_000, description="streamed requests in progress at once")
    drift_window: int = Field(500, ge=10, le=1_000_000, description="samples in the drift sliding window")
    drift_threshold: float = Field(
        0.25, gt=0, description="bundles without drift tests (made before edgepack.stats/v2): an input PSI above "
        "this is an event (0.1: moderate, 0.25: significant)")
    drift_false_alarm_rate: float | None = Field(
        None, gt=0, lt=1, description="share of windows of normal traffic allowed to alarm, all of the model's "
        "drift tests together (default: the bundle's, 0.01)")
    drift_min_samples: int = Field(50, ge=5, description="no drift verdict on fewer samples in the window")
    integer_io: bool = Field(
        False, description="full-int8 TFLite models: take and return raw int8 tensors instead of floats "
        "(callers quantize with the scale/zero point in the model metadata)")
    shadow: ShadowConfig | None = Field(None, description="run a candidate version in shadow beside this one")
    split: SplitConfig | None = Field(None, description="answer a share of requests with a B version (A/B)")


class ServerConfig(_Strict):
    """The local HTTP endpoint."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    grpc_port: int | None = Field(
        None, ge=0, le=65535, description="also serve OIP v2 over gRPC on this port (same host, token and TLS; "
        "off by default")
    token: str | None = Field(None, min_length=16, description="bearer token; required off loopback")
    token_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    graceful_shutdown_s: float = Field(30.0, ge=0, description="how long SIGTERM waits for in-flight requests")
    limit_concurrency: int = Field(
        512, ge=1, le=100_000, description="connections + requests at once; more are answered 503 by uvicorn")
    keep_alive_s: float = Field(5.0, gt=0, le=3600, description="idle keep-alive connections close after this")
    header_timeout_s: float = Field(
        10.0, gt=0, le=3600, description="a connection that has not sent a complete request head within "
        "this is closed (slow-loris clients)")
    body_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="a request body not received within this is answered 408")
    offload_bytes: int = Field(
        1024 * 1024, ge=0, description="bodies (and responses) larger than this are decoded (encoded) in a "
        "helper process, so one large request never stalls the event loop; 0 decodes everything inline")
    decode_helpers: int | None = Field(
        None, ge=1, le=64, description="helper processes that decode large bodies, each started when a large "
        "body finds the others busy (default: 2, or 1 where the daemon may use one core): on 2 cores, eight "
        "clients sending 3 MB JSON images get 1.1x the answers with two, as parsing overlaps the model's runs")
    switch_interval_ms: float = Field(
        0.5, gt=0, le=100, description="Python's GIL switch interval in the daemon (default 5 ms in Python): how "
        "long the event loop may wait for the GIL while inference threads hold it")
    intra_op_spinning: bool = Field(
        False, description="let ONNX Runtime's intra-op threads spin while a run waits for work (they stop when it "
        "returns): faster when the model has the cores to itself (on 2 cores 1.1-1.3x over HTTP), slower when "
        "other processes want them (0.75-0.8x beside one busy process; benchmarks/serving.py, overload.py)")
    large_body_budget_bytes: int | None = Field(
        None, ge=1024 * 1024, description="bytes of large bodies (over offload_bytes) in progress at once, by their "
        "Content-Length; one that would go over is answered 503 (default: an eighth of the memory, 64 MiB to 1 GiB; "
        "a body larger than the budget is taken when it is the only one)")
    refusal_delay_ms: float = Field(
        500.0, ge=0, le=10_000, description="a 503 for a full queue is written later, at most this much on "
        "average (the connection reads nothing meanwhile; its Retry-After says at least 1 s anyway): about as "
        "long as brings the refused clients back at twice what the model serves, spread out (0.5-1.5x), so "
        "clients that send again at once (an unpaced flood) keep a short queue fed and cannot make refusals at "
        "the loop's speed to starve the health probes and the accepted requests (benchmarks/overload.py); 0 "
        "answers at once")
    max_large_requests: int | None = Field(
        None, ge=1, le=1024, description="also limit large bodies in progress by count (default: only the byte budget)")

    @model_validator(mode="after")
    def _exposure(self) -> "ServerConfig":
        if self.token and self.token_file:
            raise ValueError("give token or token_file, not both")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        if self.grpc_port and self.grpc_port == self.port:
            raise ValueError(f"grpc_port and port are both {self.port}: give gRPC a port of its own")
        if not is_loopback(self.host) and not (self.token or self.token_file):
            raise ValueError(f"host {self.host!r} is not a loopback address: set token or token_file "
                             "so the API is not open to the network")
        return self

    def bearer_token(self) -> str | None:
        """The token from ``token`` or ``token_file`` (stripped), or None."""
        if self.token_file:
            try:
                token = self.token_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"server.token_file: cannot read {self.token_file}: {exc.strerror}") from None
            if len(token) < 16:
                raise ConfigError(f"server.token_file: the token in {self.token_file} is shorter than 16 characters")
            return token
        return self.token


class MqttConfig(_Strict):
    """The connection to the fleet's MQTT broker (absent: the agent runs offline, as without a network)."""

    host: str = Field(min_length=1)
    port: int = Field(1883, ge=1, le=65535)
    protocol: Literal["auto", "5", "3.1.1"] = Field("auto", description="auto: MQTT 5, else 3.1.1")
    keepalive_s: float = Field(30, ge=5, le=3600)
    username: str | None = None
    password: str | None = None
    password_file: Path | None = None
    tls: bool = Field(False, description="TLS with the system's CA certificates (or ca_file)")
    ca_file: Path | None = None
    cert_file: Path | None = Field(None, description="client certificate (mutual TLS)")
    key_file: Path | None = None
    session_expiry_s: float = Field(7 * 24 * 3600, ge=0, description="how long the broker keeps the session offline")
    reconnect_min_s: float = Field(1.0, gt=0, le=60)
    reconnect_max_s: float = Field(60.0, gt=0, le=3600)
    max_inflight: int = Field(20, ge=1, le=1000, description="QoS 1 messages sent and not yet acknowledged")
    max_packet_bytes: int = Field(
        4 * 1024 * 1024 + 64 * 1024, ge=160 * 1024, le=256 * 1024 * 1024, description="MQTT 5 Maximum Packet Size: the broker never "
        "sends this agent a larger message; with MQTT 3.1.1 larger ones are dropped unread (default: a 4 MiB "
        "streamed request and its topic)")
    receive_maximum: int = Field(32, ge=1, le=65535, description="MQTT 5 Receive Maximum: QoS 1 messages the broker "
                                 "may have in flight to this agent")

    @model_validator(mode="after")
    def _pairs(self) -> "MqttConfig":
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file and key_file go together")
        if self.password and self.password_file:
            raise ValueError("give password or password_file, not both")
        return self

    def secret(self) -> str | None:
        if self.password_file:
            try:
                return self.password_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"mqtt.password_file: cannot read {self.password_file}: {exc.strerror}") from None
        return self.password


class TelemetryConfig(_Strict):
    """Periodic telemetry, spooled on disk until the broker has it."""

    interval_s: float = Field(10.0, gt=0, le=86400)
    spool: Path | None = Field(None, description="SQLite spool file (default: <store>/spool.sqlite)")
    max_messages: int = Field(100_000, ge=10)
    max_bytes: int = Field(64 * 1024 * 1024, ge=64 * 1024)


class UpdatesConfig(_Strict):
    """Model updates over MQTT (need fleet_keys and trusted_keys) and the probation window after each.

    The probation limits here are the defaults; a signed desired state's ``probation`` budget
    overrides them. They only catch a broken model unless a budget asks for more."""

    enabled: bool = True
    groups: list[str] = Field([], description="groups whose desired state this device follows")
    probation_s: float = Field(60.0, ge=0, le=86400, description="how long a new version is watched before it commits")
    max_error_rate: float = Field(0.05, ge=0, le=1, description="failed runs / runs above the old version's rate by "
                                  "more than this rolls back")
    max_nonfinite_rate: float = Field(0.05, ge=0, le=1, description="runs with NaN/Inf outputs / runs above the old "
                                      "version's rate by more than this rolls back")
    max_latency_ratio: float | None = Field(None, gt=1, description="new per-sample time above this x the old's "
                                            "(timed side by side) rolls back; default: no limit")
    max_p95_ms: float | None = Field(None, gt=0, description="a p95 run time above this rolls back; default: none")
    min_runs: int = Field(20, ge=1, description="runs needed before error rate and live latency are judged")
    download_timeout_s: float = Field(6 * 3600, gt=0, description="a download not finished by then fails (tried "
                                      "again, 3 times in all)")
    download_window: int = Field(4, ge=1, le=64, description="chunks requested at once")
    chunk_timeout_s: float = Field(10.0, gt=0, description="a requested chunk not received by then is asked again")
    http_sources: bool = Field(True, description="download from the HTTP(S) source a signed desired state names "
                               "(Range requests, checked chunk by chunk); off: MQTT chunks only")
    http_ca_file: Path | None = Field(None, description="CA bundle for https sources (default: the system's)")
    http_timeout_s: float = Field(20.0, gt=0, le=600, description="an HTTP source silent this long is tried again")
    http_attempts: int = Field(4, ge=1, le=100, description="tries of an HTTP source without progress before the "
                               "rest of the bundle comes over MQTT")


class AgentConfig(_Strict):
    """The whole ``agent.yaml``."""

    device_id: str | None = Field(None, description="this device's id (default: the host name)")
    profile: str | None = Field(None, description="this device's profile; bundles for another are refused")
    store: Path | None = Field(None, description="model store folder (default: $EDGEPACK_STORE or per-user)")
    trusted_keys: list[Path] = Field([], description="build keys; when set, bundles must be signed by one")
    fleet_keys: list[Path] = Field([], description="fleet keys: desired states over MQTT must be signed by one")
    server: ServerConfig = Field(default_factory=ServerConfig)
    models: list[ModelConfig] = Field([], description="per-model options; models not listed use defaults")
    serve_all: bool = Field(True, description="serve every model in the store, not only the listed ones")
    watch_interval_s: float = Field(0.2, gt=0, le=60, description="how often the store is checked for installs")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    mqtt: MqttConfig | None = Field(None, description="the fleet broker; absent: no telemetry or updates")
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    updates: UpdatesConfig = Field(default_factory=UpdatesConfig)

    @model_validator(mode="after")
    def _unique_models(self) -> "AgentConfig":
        names = [model.name for model in self.models]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"models: {', '.join(duplicates)} listed more than once")
        return self

    @model_validator(mode="after")
    def _topic_levels(self) -> "AgentConfig":
        # Names that go into MQTT topics must be one topic level each ('+', '#', '/' would widen a
        # subscription or change the topic).
        from edgepack.bundle.format import is_valid_name

        bad = [f"updates.groups: {g!r}" for g in self.updates.groups if not is_valid_name(g)]
        bad += [f"models: {m.name!r}" for m in self.models if not is_valid_name(m.name)]
        if self.device_id is not None and not is_valid_name(self.device_id):
            bad.append(f"device_id: {self.device_id!r}")
        if bad:
            raise ValueError("; ".join(bad) + " must be letters, digits, '.', '_' or '-' (one MQTT topic level)")
        return self

    def model(self, name: str) -> ModelConfig:
        """The options for model ``name`` (defaults when it is not listed)."""
        for model in self.models:
            if model.name == name:
                return model
        return ModelConfig(name=name)  # built only when missing: it is a pydantic model (every request asks)


def load_config(path: Path | None, overrides: dict | None = None) -> AgentConfig:
    """Read and validate ``path`` (None: defaults); ``overrides`` maps dotted keys to values."""
    data: dict = {}
    label = str(path) if path else "(defaults)"
    if path:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({first_line(exc)}); fix the syntax") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the config must be a YAML mapping of keys to values")
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        target = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = value
    try:
        config = AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{label}: " + "; ".join(validation_problems(exc))) from None
    if path:
        base = Path(path).resolve().parent
        # Relative paths in the file are relative to the file, as in systemd units and most daemons.
        config.store = _relative(base, config.store)
        config.trusted_keys = [_relative(base, key) for key in config.trusted_keys]
        config.fleet_keys = [_relative(base, key) for key in config.fleet_keys]
        for model in config.models:
            model.bundle = _relative(base, model.bundle)
            for extra in (model.shadow, model.split):
                if extra is not None:
                    extra.bundle = _relative(base, extra.bundle)
        for key in ("token_file", "tls_cert", "tls_key"):
            setattr(config.server, key, _relative(base, getattr(config.server, key)))
        if config.mqtt:
            for key in ("password_file", "ca_file", "cert_file", "key_file"):
                setattr(config.mqtt, key, _relative(base, getattr(config.mqtt, key)))
        config.telemetry.spool = _relative(base, config.telemetry.spool)
        config.updates.http_ca_file = _relative(base, config.updates.http_ca_file)
    config.server.bearer_token()  # a missing/short token file is a config error at start, not at request time
    if config.mqtt:
        config.mqtt.secret()
        # A wrong certificate path would otherwise only surface as a traceback in the MQTT thread.
        for key in ("ca_file", "cert_file", "key_file"):
            path = getattr(config.mqtt, key)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{label}: mqtt.{key}: {path} is not a readable file; fix the path")
    return config


def add_candidate(config: AgentConfig, kind: str, bundle: Path, percent: float | None = None) -> None:
    """Give the model of ``bundle`` a shadow candidate or an A/B split's B version (``--shadow``,
    ``--split``): the model's entry in ``config.models`` gains it (a new entry when it has none)."""
    from edgepack.bundle import open_bundle

    try:
        with open_bundle(bundle, verify_files=False) as opened:
            name = opened.manifest["name"]
    except EdgepackError as exc:
        raise ConfigError(f"--{kind} {bundle}: {exc.message}") from None
    entry = next((model for model in config.models if model.name == name), None)
    if entry is None:
        entry = ModelConfig(name=name)
        config.models.append(entry)
    try:
        value = ShadowConfig(bundle=bundle) if kind == "shadow" else SplitConfig(bundle=bundle, percent=percent)
    except ValidationError as exc:
        raise ConfigError(f"--{kind} {bundle}: " + "; ".join(validation_problems(exc))) from None
    setattr(entry, kind, value)


def _relative(base: Path, value: Path | None) -> Path | None:
    if value is None or value.is_absolute():
        return value
    return base / value
