"""Bad settings stop `whisper-server serve` before anything starts, naming the flag or variable and the value."""

from __future__ import annotations

import os
import subprocess

import pytest


@pytest.mark.parametrize("args, env, message", [
    (["--metrics-port", "8000"], {}, "--metrics-port must differ from --port (both 8000)"),
    (["--max-batch-size", "0"], {}, "--max-batch-size must be positive, got 0"),
    ([], {"WHISPER_METRICS_PORT": "nine"}, "WHISPER_METRICS_PORT='nine' is not a valid int"),
    (["--device", "tpu"], {}, "argument --device: invalid choice: 'tpu'"),
    ([], {"WHISPER_API_KEY": "clé-secrète"}, "--api-key (WHISPER_API_KEY) must be visible ASCII characters"),
    (["--api-key", "two words"], {}, "--api-key (WHISPER_API_KEY) must be visible ASCII characters"),
    (["--upload-idle-seconds", "60", "--upload-timeout-seconds", "30"], {},
     "--upload-idle-seconds (60) must not exceed --upload-timeout-seconds (30)"),
    (["--upload-min-bytes-per-second", "0"], {}, "--upload-min-bytes-per-second must be positive, got 0.0"),
    ([], {"WHISPER_MIN_SEGMENT_SPEECH_SECONDS": "-0.5"}, "--min-segment-speech-seconds must not be negative"),
])
def test_bad_settings_exit_2_with_a_message(args, env, message):
    result = subprocess.run(["whisper-server", "serve", "--port", "8000", *args], capture_output=True, text=True,
                            env={**os.environ, **env}, timeout=60)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
