"""Audio decoding (PyAV: ffmpeg's libraries inside the wheel, no ffmpeg binary or subprocess)."""

from __future__ import annotations

from collections.abc import Callable

import av
import numpy as np

from .decoding import SAMPLE_RATE


class AudioError(Exception):
    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def decode_audio(path: str, max_seconds: float, on_samples: Callable[[int], None] = lambda total: None) -> np.ndarray:
    """Decodes any container/codec ffmpeg knows to 16 kHz mono float32, stopping as soon as it passes max_seconds.
    `on_samples` hears the count decoded so far after each chunk, and may stop the decoding by raising."""
    try:
        container = av.open(path, metadata_errors="ignore")
    except av.error.InvalidDataError as error:
        raise AudioError(400, "The file could not be decoded as audio (unrecognised or corrupt data).", "invalid_audio") from error
    except av.error.FFmpegError as error:
        raise AudioError(400, f"The file could not be read as audio: {error.strerror or error}.", "invalid_audio") from error
    with container:
        if not container.streams.audio:
            kinds = ", ".join(sorted({s.type for s in container.streams})) or "no streams"
            raise AudioError(415, f"Unsupported media: the file has no audio stream ({kinds}).", "unsupported_media")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        max_samples = int(max_seconds * SAMPLE_RATE)
        chunks, total = [], 0
        try:
            for frame in container.decode(stream):
                for resampled in resampler.resample(frame):
                    chunk = resampled.to_ndarray().reshape(-1)
                    chunks.append(chunk)
                    total += len(chunk)
                if total > max_samples:
                    raise AudioError(400, f"The audio is longer than the maximum of {max_seconds:g} seconds.", "audio_too_long")
                on_samples(total)
            for resampled in resampler.resample(None):
                chunks.append(resampled.to_ndarray().reshape(-1))
                total += len(chunks[-1])
            on_samples(total)
        except av.error.FFmpegError as error:
            if not chunks:
                raise AudioError(400, f"The audio could not be decoded: {error.strerror or error}.", "invalid_audio") from error
            # A damaged tail still yields the audio before it, as ffmpeg does.
    samples = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    if len(samples) > max_samples:
        raise AudioError(400, f"The audio is longer than the maximum of {max_seconds:g} seconds.", "audio_too_long")
    if len(samples) < SAMPLE_RATE // 100:
        raise AudioError(400, "The file contains no audio samples (empty or truncated).", "empty_audio")
    not_finite = len(samples) - np.count_nonzero(np.isfinite(samples))
    if not_finite:
        raise AudioError(400, f"The audio has {not_finite} samples that are not finite numbers (NaN or infinity); "
                              "a float file must hold real sample values.", "non_finite_audio")
    return samples
