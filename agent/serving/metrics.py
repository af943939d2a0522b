"""Prometheus metrics of the serving path (``GET /metrics``), in their own registry.

The same collectors feed :meth:`ServingMetrics.snapshot`, which the telemetry publisher sends over
MQTT, so the dashboard and the fleet see the same numbers.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .statistics import InferenceStatistics

# Edge models answer in 0.1 ms .. seconds; the default buckets start at 5 ms.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# "*_created" timestamp series double the output and no dashboard reads them.
disable_created_metrics()


class ServingMetrics:
    """Every metric the agent's HTTP path records."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        #: Triton's statistics extension (GET /v2/models/{name}/stats), per model version
        self.statistics = InferenceStatistics()
        r = self.registry
        self.requests = Counter("edgepack_requests", "Inference requests by outcome", ["model", "outcome"], registry=r)
        self.request_seconds = Histogram("edgepack_request_seconds", "Time from request to response",
                                         ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_seconds = Histogram("edgepack_queue_seconds", "Time a request waited for a batch",
                                       ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.inference_seconds = Histogram("edgepack_inference_seconds", "Time the runtime took per batch",
                                           ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("edgepack_batch_size", "Samples per executed batch", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("edgepack_queue_depth", "Requests waiting for a batch", ["model"], registry=r)
        self.model_load_seconds = Gauge("edgepack_model_load_seconds", "Load + smoke-test time of the active version",
                                        ["model"], registry=r)
        self.active = Gauge("edgepack_model_active", "1 for the active version of each model",
                            ["model", "version", "slot"], registry=r)
        self.swaps = Counter("edgepack_model_swaps", "Times a new version took over traffic", ["model"], registry=r)
        self.drift = Gauge("edgepack_drift_psi", "Population stability index of live input values vs the "
                           "bundle's reference histogram (sliding window)", ["model", "score"], registry=r)
        self.drift_p = Gauge("edgepack_drift_p_value", "p-value of a drift score's test (K-S per feature, G-test of "
                             "classes; Bonferroni) on the sliding window vs the validation data", ["model", "score"],
                             registry=r)
        self.drift_statistic = Gauge("edgepack_drift_statistic", "The worst test statistic of a drift score (K-S D or G)",
                                     ["model", "score"], registry=r)
        self.drift_window = Gauge("edgepack_drift_window_samples", "Samples in the drift sliding window", ["model"],
                                  registry=r)
        self.mqtt_connected = Gauge("edgepack_mqtt_connected", "1 while the fleet link is connected to the broker",
                                    ["protocol"], registry=r)
        self.mqtt_failures = Counter("edgepack_mqtt_connect_failures", "Failed connection attempts to the broker, "
                                     "by reason", ["reason"], registry=r)
        self.stream_connected = Gauge("edgepack_mqtt_stream_connected", "1 while the MQTT streams' own connection "
                                      "({device}-stream) is up", registry=r)
        self.stream_failures = Counter("edgepack_mqtt_stream_connect_failures", "Failed or lost connections of the "
                                       "MQTT streams' own connection, and refused subscriptions, by reason", ["reason"], registry=r)
        self.loop_failures = Counter("edgepack_background_failures", "Exceptions a periodic task of the daemon "
                                     "survived (logged), by task", ["task"], registry=r)
        self.dropped_messages = Counter("edgepack_mqtt_dropped_messages", "Incoming MQTT messages dropped unread "
                                        "(too large, or the daemon too far behind), by reason", ["reason"], registry=r)
        self.shadow_requests = Counter("edgepack_shadow_requests", "Requests mirrored to a shadow candidate, by "
                                       "outcome (offered, compared, dropped, errors, nonfinite)",
                                       ["model", "version", "outcome"], registry=r)
        self.shadow_seconds = Histogram("edgepack_shadow_run_seconds", "Time the shadow candidate took per mirrored "
                                        "request", ["model", "version"], buckets=LATENCY_BUCKETS, registry=r)
        self.shadow_agreement = Gauge("edgepack_shadow_agreement", "How often the shadow candidate agrees with the "
                                      "active version (top-1 for classes, IoU for maps, else cosine)",
                                      ["model", "version"], registry=r)
        self.split_requests = Counter("edgepack_split_requests", "Requests answered per version of an A/B split",
                                      ["model", "version", "role"], registry=r)
        self.load_failures = Counter("edgepack_model_load_failures", "Versions that failed to load or smoke-test",
                                     ["model"], registry=r)

    def model_active(self, model: str, version: str, slot: str | None, old_version: str | None, old_slot: str | None) -> None:
        if old_version is not None:
            try:
                self.active.remove(model, old_version, old_slot or "")
            except KeyError:
                pass
            self.swaps.labels(model).inc()
        self.active.labels(model, version, slot or "").set(1)

    def observe_batch(self, model: str, size: int, seconds: float, version: str | None = None) -> None:
        self.batch_size.labels(model).observe(size)
        self.inference_seconds.labels(model).observe(seconds)
        if version is not None:
            self.statistics.batch(model, version, size, seconds)

    def observe_request(self, model: str, outcome: str, total: float | None = None, queued: float | None = None) -> None:
        self.requests.labels(model, outcome).inc()
        if total is not None:
            self.request_seconds.labels(model).observe(total)
        if queued is not None:
            self.queue_seconds.labels(model).observe(queued)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    def snapshot(self) -> dict:
        """Plain numbers for telemetry: {metric name: {label string: value}}."""
        data: dict[str, dict[str, float]] = {}
        for family in self.registry.collect():
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                data.setdefault(sample.name, {})[labels] = sample.value
        return data
