"""The Prometheus metrics named in DESIGN.md, in one registry per server."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("http_requests", "HTTP requests answered, by route template and status",
                                ["method", "route", "status"], registry=self.registry)
        self.request_duration = Histogram(
            "http_request_duration_seconds", "Time from request start to response end", ["method", "route"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200), registry=self.registry)
        self.in_flight = Gauge("whisper_requests_in_flight", "Transcription and translation requests being handled",
                               registry=self.registry)
        self.queue_depth = Gauge("whisper_queue_depth", "30 s windows waiting for the model", registry=self.registry)
        self.queued_audio = Gauge("whisper_queued_audio_seconds", "Seconds of audio waiting for the model",
                                  registry=self.registry)
        self.audio_seconds = Counter("whisper_audio_seconds", "Seconds of audio transcribed or translated",
                                     registry=self.registry)
        self.batch_size = Histogram("whisper_batch_size", "Busy decode slots (windows decoding together) per step",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.decode_step = Histogram(
            "whisper_decode_step_seconds", "Time of one decode step over every busy slot, host read-back included",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1), registry=self.registry)
        self.refusals = Counter("whisper_refused_requests", "Requests answered with an error, by reason (the error "
                                "code in the answer: uploads_full, upload_too_slow, disk_full, ...)", ["reason"],
                                registry=self.registry)
        self.first_delta = Histogram(
            "whisper_stream_first_delta_seconds", "Time from a streamed request's arrival to its first text delta",
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600), registry=self.registry)
        self.realtime_sessions = Gauge("whisper_realtime_sessions", "Live transcription sessions open (/v1/realtime)",
                                       registry=self.registry)
        self.realtime_turn_latency = Histogram(
            "whisper_realtime_turn_latency_seconds",
            "Time from a live turn's end (speech stopped, or the client's commit) to its completed transcript",
            buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2.5, 5, 10, 30), registry=self.registry)
        self.realtime_audio_seconds = Counter("whisper_realtime_audio_seconds",
                                              "Seconds of audio received by live sessions", registry=self.registry)
        self.model_load = Gauge("whisper_model_load_seconds", "Time taken to load the model", registry=self.registry)

    def on_queue_change(self, windows: int, seconds: float) -> None:
        self.queue_depth.set(windows)
        self.queued_audio.set(seconds)
