"""`whisper-server serve` and `whisper-server make-test-model DIR`. Every serve flag can also come from WHISPER_<NAME>."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Settings:
    model: str = "openai/whisper-large-v3"
    device: str = "auto"
    dtype: str = "auto"
    host: str = "0.0.0.0"
    port: int = 8000
    max_batch_size: int = 16
    batch_wait_ms: float = 10.0
    max_upload_mb: float = 100.0
    max_audio_seconds: float = 7200.0
    queue_size: int = 64
    api_key: str | None = None
    request_timeout_seconds: float = 600.0
    drain_seconds: float = 30.0
    offline: bool = False
    cpu_threads: int | None = None
    max_new_tokens: int | None = None
    fixed_new_tokens: bool = False


CHOICES = {"device": ("auto", "cuda", "cpu"), "dtype": ("auto", "float16", "bfloat16", "float32")}
HELP = {
    "model": "Hugging Face model id (downloaded once into HF_HOME) or a local checkpoint directory",
    "device": "where the model runs; auto picks cuda when a GPU is visible",
    "dtype": "weights and activations; auto is float16 on cuda, float32 on cpu",
    "max_batch_size": "decode slots: most 30 s windows decoding at once, across requests (sizes the KV cache)",
    "batch_wait_ms": ("while windows decode, how long newly arrived windows wait for more to share one encoder pass "
                      "(an idle engine starts a window at once)"),
    "max_upload_mb": "largest request body, enforced while it is received (413 beyond it)",
    "max_audio_seconds": "longest audio accepted after decoding (400 beyond it)",
    "queue_size": "most requests admitted and unfinished; more get 503 with Retry-After",
    "api_key": "when set, /v1/* requires 'Authorization: Bearer <key>'",
    "request_timeout_seconds": "deadline for decoding and transcribing one request (504 beyond it)",
    "drain_seconds": "after SIGTERM, how long in-flight requests may take to finish before exit",
    "offline": "never contact the Hugging Face Hub; the model must be in HF_HOME or a local directory",
    "cpu_threads": "torch threads on --device cpu (default: torch's choice, one per core); 1 is best on a busy machine",
    "max_new_tokens": "cap on tokens decoded per 30 s window (default: the checkpoint's generation config)",
    "fixed_new_tokens": ("benchmarks only: decode exactly --max-new-tokens tokens per window, whatever the weights say, "
                         "with no temperature fallback and no silence drop"),
}
POSITIVE = {"port", "max_batch_size", "max_upload_mb", "max_audio_seconds", "queue_size",
            "request_timeout_seconds", "max_new_tokens", "cpu_threads"}


def env_name(name: str) -> str:
    return "WHISPER_" + name.upper()


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    for field in fields(Settings):
        kind = {"int": int, "float": float, "bool": parse_bool}.get(field.type.split(" ")[0], str)
        raw = os.environ.get(env_name(field.name))
        default = field.default
        if raw is not None:
            try:
                default = kind(raw)
            except (ValueError, argparse.ArgumentTypeError):
                parser.error(f"{env_name(field.name)}={raw!r} is not a valid {kind.__name__}")
        flag = "--" + field.name.replace("_", "-")
        extra = {"nargs": "?", "const": True} if kind is parse_bool else {}
        parser.add_argument(flag, type=kind, default=default, choices=CHOICES.get(field.name),
                            help=f"{HELP.get(field.name, field.name)} [env {env_name(field.name)}; default {field.default}]",
                            **extra)


def validate(settings: Settings, parser: argparse.ArgumentParser) -> None:
    for name in POSITIVE:
        value = getattr(settings, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    for name, allowed in CHOICES.items():
        if getattr(settings, name) not in allowed:
            parser.error(f"{env_name(name)}={getattr(settings, name)!r} is not one of {', '.join(allowed)}")
    if settings.fixed_new_tokens and not settings.max_new_tokens:
        parser.error("--fixed-new-tokens needs --max-new-tokens")
    if settings.batch_wait_ms < 0 or settings.drain_seconds < 0:
        parser.error("--batch-wait-ms and --drain-seconds must not be negative")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="whisper-server", description="OpenAI-compatible Whisper speech server")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP server")
    add_serve_arguments(serve)
    make = commands.add_parser("make-test-model", help="write a random-weight Whisper checkpoint, offline")
    make.add_argument("directory")
    make.add_argument("--architecture", choices=("tiny", "large-v3"), default="tiny",
                      help="tiny runs on CPU in seconds; large-v3 has the real model's shapes (for GPU benchmarks)")
    args = parser.parse_args(argv)

    if args.command == "make-test-model":
        from .test_model import make_test_model

        print(make_test_model(args.directory, args.architecture))
        return 0
    settings = Settings(**{field.name: getattr(args, field.name) for field in fields(Settings)})
    validate(settings, serve)
    from .server import run

    return run(settings)


if __name__ == "__main__":
    sys.exit(main())
