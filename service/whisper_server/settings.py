"""The server's settings: one frozen object, read from flags and WHISPER_<NAME> variables by the CLI and passed to
every part that needs it. It imports nothing of the server, so anything may import it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    model: str = "openai/whisper-large-v3"
    device: str = "auto"
    dtype: str = "auto"
    host: str = "0.0.0.0"
    port: int = 8000
    metrics_port: int = 9090
    max_batch_size: int = 16
    batch_wait_ms: float = 10.0
    max_upload_mb: float = 100.0
    max_audio_seconds: float = 7200.0
    max_audio_seconds_per_mb: float = 4000.0
    queue_size: int = 64
    max_queued_audio_seconds: float = 14400.0
    max_concurrent_uploads: int = 64
    max_spool_mb: float = 1024.0
    max_uploads_per_client: int = 8
    upload_timeout_seconds: float = 900.0
    upload_idle_seconds: float = 30.0
    upload_min_bytes_per_second: float = 16384.0
    head_timeout_seconds: float = 10.0
    keep_alive_seconds: float = 15.0
    max_connections: int = 1024
    max_connections_per_client: int = 128
    forwarded_allow_ips: str = "127.0.0.1"
    api_key: str | None = None
    request_timeout_seconds: float = 600.0
    drain_seconds: float = 30.0
    offline: bool = False
    cpu_threads: int | None = None
    max_new_tokens: int | None = None
    fixed_new_tokens: bool = False
    cuda_graphs: bool = True
    max_realtime_sessions: int = 64
    realtime_idle_seconds: float = 60.0
    realtime_max_session_seconds: float = 3600.0
    realtime_max_message_mb: float = 15.0
    realtime_max_buffered_seconds: float = 120.0
    realtime_max_pending_events: int = 256
    feature_padding: str = "reference"
    decode_timestamps: str = "when-needed"
    beam_size: int = 1
    condition_on_previous_text: bool = False
    min_segment_speech_seconds: float = 0.1


CHOICES = {"device": ("auto", "cuda", "cpu"), "dtype": ("auto", "float16", "bfloat16", "float32"),
           "feature_padding": ("reference", "zeros"), "decode_timestamps": ("when-needed", "always")}
HELP = {
    "model": "Hugging Face model id (downloaded once into HF_HOME) or a local checkpoint directory",
    "device": "where the model runs; auto picks cuda when a GPU is visible",
    "dtype": "weights and activations; auto is float16 on cuda, float32 on cpu",
    "port": "the API port: the speech endpoints, /v1/models, the probes and the web page",
    "metrics_port": "/metrics (Prometheus) on its own port, which the load balancer does not expose",
    "max_batch_size": "decode slots: most 30 s windows decoding at once, across requests (sizes the KV cache)",
    "batch_wait_ms": ("while windows decode, how long newly arrived windows wait for more to share one encoder pass "
                      "(an idle engine starts a window at once)"),
    "max_upload_mb": "largest request body, enforced while it is received (413 beyond it)",
    "max_audio_seconds": "longest audio accepted after decoding (400 beyond it)",
    "max_audio_seconds_per_mb": ("most seconds of audio one MB (2^20 bytes) of upload may decode to, so a request's cost "
                                 "follows its upload (400 beyond it); the default, 2 kbit/s, is below any speech "
                                 "codec's bit rate"),
    "queue_size": "most requests admitted and unfinished; more get 503 with Retry-After",
    "max_queued_audio_seconds": ("most seconds of decoded audio held at once, counted while files decode, across "
                                 "requests (64 KB each in this process and again in the engine's); more get 503"),
    "max_concurrent_uploads": "most uploads received at once; more get 503 before their body is read",
    "max_spool_mb": ("most upload bytes spooled to the temp dir at once (a declared body is reserved before it is "
                     "read); more get 503"),
    "max_uploads_per_client": ("once half the upload slots (or the spool) are in use, the most uploads one client "
                               "(address) may have in progress, and its share of the spool: this many uploads' worth "
                               "of --max-spool-mb / --max-concurrent-uploads, at least one --max-upload-mb; more get "
                               "429"),
    "upload_timeout_seconds": ("deadline for receiving a whole request body (408 beyond it); the default fits 100 MB "
                               "over a 1 Mbit/s link"),
    "upload_idle_seconds": "longest wait for the next part of a request body (408 beyond it)",
    "upload_min_bytes_per_second": ("slowest average a request body may arrive at, judged once it has been arriving "
                                    "for --upload-idle-seconds (408 below it: a trickle cannot hold an upload slot)"),
    "head_timeout_seconds": ("deadline for a request's head (its line and headers, a WebSocket handshake's too), from "
                             "the connection's start or its next request's first byte (408, or a close where nothing "
                             "came)"),
    "keep_alive_seconds": ("how long an idle keep-alive connection stays open between requests (behind an ALB: more "
                           "than the ALB's idle timeout)"),
    "max_connections": ("most connections open at once on the API port, WebSockets included (fewer where the "
                        "open-files limit leaves less after a reserve); more are answered 503 with Retry-After at once"),
    "max_connections_per_client": ("most connections one client address holds at once (trusted proxies, "
                                   "--forwarded-allow-ips, pass by); more are answered 503 at once"),
    "forwarded_allow_ips": ("proxies (addresses or CIDRs, comma-separated, or *) whose X-Forwarded-For names the "
                            "client, for the per-client bounds and the request log"),
    "api_key": "when set, /v1/* requires 'Authorization: Bearer <key>'",
    "request_timeout_seconds": "deadline for decoding and transcribing one request (504 beyond it)",
    "drain_seconds": "after SIGTERM, how long in-flight requests may take to finish before exit",
    "offline": "never contact the Hugging Face Hub; the model must be in HF_HOME or a local directory",
    "cpu_threads": "torch threads on --device cpu (default: torch's choice, one per core); 1 is best on a busy machine",
    "max_new_tokens": ("cap on tokens decoded per window (default: OpenAI's sample length, 224, or the checkpoint's "
                       "max_length where smaller)"),
    "fixed_new_tokens": ("benchmarks only: decode exactly --max-new-tokens tokens per window, whatever the weights say, "
                         "every 30 s of audio a window (no voice-activity detection), with no temperature fallback, "
                         "no silence drop and no seek"),
    "cuda_graphs": ("on cuda, capture the decode step once per slot-count bucket as a CUDA graph and replay it; "
                    "false runs the same step eagerly (slower; for diagnosis)"),
    "max_realtime_sessions": "most live transcription sessions (/v1/realtime WebSockets) at once; more are refused",
    "realtime_idle_seconds": ("a live session that sends nothing for this long, with no turn being transcribed, is "
                              "closed"),
    "realtime_max_session_seconds": "longest a live session may last (OpenAI's limit is 60 minutes)",
    "realtime_max_message_mb": "largest client event a live session takes (OpenAI's 15 MiB per append)",
    "realtime_max_buffered_seconds": ("most seconds of a live session's audio held ahead of the decoder (not yet "
                                      "committed, or committed and not yet transcribed); appends beyond it are "
                                      "refused"),
    "realtime_max_pending_events": ("most server events queued for a live session's client; a client that stops "
                                    "reading past it is disconnected"),
    "feature_padding": ("how a window shorter than 30 s is padded to the encoder's 30 s: reference pads the audio "
                        "with silence, as transformers does (its exact tokens, and fewer word errors on our "
                        "development clips); zeros pads the log-mel features with 0.0, as faster-whisper and OpenAI's "
                        "transcribe (since its release 20240927) do"),
    "beam_size": ("sequences a window decodes at once: at temperature 0 a beam search of this many beams (OpenAI's "
                  "BeamSearchDecoder, patience 1), at the fallback temperatures this many samples, the likeliest kept "
                  "(best_of); 1 is greedy. Each beam holds its own self-attention cache (the window's cross-attention "
                  "K/V is shared), so a slot's memory grows with it"),
    "condition_on_previous_text": ("each window of a file is prompted with the text of the windows before it (OpenAI's "
                                   "and faster-whisper's default; the prompt starts again after a window decoded "
                                   "above temperature 0.5): names and spellings carry from window to window, but a "
                                   "file's windows decode one after another instead of side by side, so a long file "
                                   "takes longer on an idle server. Live turns are not conditioned"),
    "min_segment_speech_seconds": ("a segment decoded with timestamps whose time span holds less speech than this, as "
                                   "the voice-activity detector hears it, is dropped: text made up for silence, "
                                   "clicks or noise between sentences; 0 keeps every segment"),
    "decode_timestamps": ("when-needed decodes timestamp tokens only for answers with segment times (verbose_json, "
                          "srt, vtt, segment or word granularities); json, text and plain streams decode without them "
                          "(fewer word errors and tokens), a window's text timed by its voice-activity window; always "
                          "decodes them for every request, as OpenAI's reference does"),
}
POSITIVE = {"port", "metrics_port", "max_batch_size", "max_upload_mb", "max_audio_seconds", "max_audio_seconds_per_mb",
            "queue_size",
            "max_queued_audio_seconds", "max_concurrent_uploads", "max_spool_mb", "request_timeout_seconds",
            "max_new_tokens", "cpu_threads", "max_uploads_per_client", "upload_timeout_seconds", "upload_idle_seconds",
            "upload_min_bytes_per_second", "max_realtime_sessions", "realtime_idle_seconds",
            "realtime_max_session_seconds", "realtime_max_message_mb", "realtime_max_buffered_seconds",
            "realtime_max_pending_events", "beam_size", "head_timeout_seconds",
            "keep_alive_seconds", "max_connections", "max_connections_per_client"}



def env_name(name: str) -> str:
    return "WHISPER_" + name.upper()
