"""Prometheus metrics, on a registry owned by one service (never the global one)."""

from __future__ import annotations

from htrctl.protocol import STATES

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)


class Metrics:
    def __init__(self, batch_sizes: list[int]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram

        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("htrd_requests", "HTTP requests answered", ["endpoint", "code"], registry=r)
        self.request_seconds = Histogram(
            "htrd_request_duration_seconds", "HTTP request latency", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.images = Counter("htrd_images", "images (pages, lines) transcribed", registry=r)
        self.errors = Counter("htrd_errors", "failed requests or images, by error type", ["type"], registry=r)
        buckets = sorted({float(b) for b in batch_sizes} | {float(max(batch_sizes)) + 1})
        self.batch_size = Histogram("htrd_batch_size", "images per generate call", buckets=buckets, registry=r)
        self.generate_seconds = Histogram(
            "htrd_generate_duration_seconds", "duration of one generate call", buckets=LATENCY_BUCKETS, registry=r
        )
        self.generated_tokens = Counter("htrd_generated_tokens", "tokens generated", registry=r)
        self.tokens_per_second = Gauge(
            "htrd_generation_tokens_per_second", "generated tokens per second in the last generate call", registry=r
        )
        self.generating = Gauge("htrd_generate_running", "images in the generate call now running", registry=r)
        self.queue_depth = Gauge("htrd_queue_depth", "images waiting for the model", registry=r)
        self.queue_capacity = Gauge("htrd_queue_capacity", "limits.queue_length", registry=r)
        self.in_flight = Gauge("htrd_in_flight_requests", "transcription requests being served", registry=r)
        self.pixels_in_flight = Gauge("htrd_pixels_in_flight", "declared pixels of the requests being served",
                                      registry=r)
        self.pixel_limit = Gauge("htrd_pixel_limit", "effective pixel limits (htrd.budget): per image, per request, "
                                 "in flight", ["scope"], registry=r)
        self.client_errors = Counter("htrd_client_disconnects", "requests the client abandoned mid-body "
                                     "(disconnect) or broke (HTTP protocol error), by kind", ["kind"], registry=r)
        self.gpu_memory = Gauge("htrd_gpu_memory_bytes", "GPU memory of this process", ["kind"], registry=r)
        self.load_seconds = Gauge("htrd_load_seconds", "time to load the model", registry=r)
        self.warmup_seconds = Gauge("htrd_warmup_seconds", "time to warm up every batch size", registry=r)
        # htrd_gc_pause_seconds: htrd.heap.PauseWatch, a collector of its own on this registry
        self.gc_frozen_objects = Gauge("htrd_gc_frozen_objects", "objects of the loaded heap that no garbage "
                                       "collection walks (htrd.heap)", registry=r)
        self.state = Enum("htrd_state", "readiness state", states=list(STATES), registry=r)

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
