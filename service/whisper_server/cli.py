"""`whisper-server serve`, `whisper-server make-test-model DIR` and `whisper-server convert-ct2 SRC DST`. Every serve
flag can also come from WHISPER_<NAME>."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields

from .decoding import WINDOW_SECONDS
from .settings import CHOICES, HELP, POSITIVE, Settings, env_name


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
    if settings.batch_wait_ms < 0 or settings.drain_seconds < 0 or settings.min_segment_speech_seconds < 0:
        parser.error("--batch-wait-ms, --drain-seconds and --min-segment-speech-seconds must not be negative")
    # Each bound must admit one request at its largest, or such a request could never be served.
    if settings.max_spool_mb < settings.max_upload_mb:
        parser.error(f"--max-spool-mb ({settings.max_spool_mb:g}) must be at least --max-upload-mb ({settings.max_upload_mb:g})")
    if settings.max_queued_audio_seconds < settings.max_audio_seconds:
        parser.error(f"--max-queued-audio-seconds ({settings.max_queued_audio_seconds:g}) must be at least "
                     f"--max-audio-seconds ({settings.max_audio_seconds:g})")
    if settings.upload_idle_seconds > settings.upload_timeout_seconds:
        parser.error(f"--upload-idle-seconds ({settings.upload_idle_seconds:g}) must not exceed --upload-timeout-seconds "
                     f"({settings.upload_timeout_seconds:g})")
    if settings.api_key and not all("!" <= character <= "~" for character in settings.api_key):
        # A bearer token is visible ASCII: a key with other characters (or spaces) could never be sent and matched.
        parser.error("--api-key (WHISPER_API_KEY) must be visible ASCII characters without spaces, "
                     "as an 'Authorization: Bearer' header carries it")
    if settings.realtime_max_buffered_seconds <= WINDOW_SECONDS:
        # A live turn's 30 s window is cut from the audio held: the bound must hold one window and a little more.
        parser.error(f"--realtime-max-buffered-seconds must exceed {WINDOW_SECONDS:g} (a window), got "
                     f"{settings.realtime_max_buffered_seconds:g}")
    if settings.metrics_port == settings.port:
        parser.error(f"--metrics-port must differ from --port (both {settings.port})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="whisper-server", description="OpenAI-compatible Whisper speech server")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP server")
    add_serve_arguments(serve)
    make = commands.add_parser("make-test-model", help="write a random-weight Whisper checkpoint, offline")
    make.add_argument("directory")
    make.add_argument("--architecture", choices=("tiny", "large-v3"), default="tiny",
                      help="tiny runs on CPU in seconds; large-v3 has the real model's shapes (for GPU benchmarks)")
    convert = commands.add_parser(
        "convert-ct2", help="write a CTranslate2 Whisper model (faster-whisper's format) as a Hugging Face checkpoint",
        description="Exact conversion, offline: every weight copied bit for bit, with the tokenizer, the feature "
                    "extractor and a generation config carrying the source's alignment heads and suppress lists.")
    convert.add_argument("source", help="the CTranslate2 model folder (model.bin, config.json, tokenizer.json)")
    convert.add_argument("destination", help="the checkpoint folder to write (replaced whole)")
    convert.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                         help="float32 widens float16 weights without rounding (the fastest on CPU); float16 keeps "
                              "float16 weights as they are (half the size)")
    args = parser.parse_args(argv)

    if args.command == "convert-ct2":
        from .ct2_convert import ConversionError, convert as convert_ct2

        try:
            print(convert_ct2(args.source, args.destination, args.dtype))
        except ConversionError as error:
            convert.error(str(error))
        return 0

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
