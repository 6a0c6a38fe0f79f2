"""Audio decoding (PyAV: ffmpeg's libraries inside the wheel, no ffmpeg binary or subprocess).

What a request's audio costs follows what was uploaded: sample rates no recording uses are refused before a frame is
decoded (a header declaring 1 Hz made a 14 KB WAV decode to 7,000 s), and decoding stops as soon as the audio passes
a bound per uploaded byte. The decoded audio costs its 4 bytes a sample and one block more while it decodes, never a
second full copy (see DECODED_BYTES_PER_SECOND)."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

import av
import numpy as np

from .decoding import SAMPLE_RATE

# Telephone audio's rate, the lowest any speech recording uses; below it a file is refused.
MIN_SAMPLE_RATE = 8_000
# Decoded samples gather in blocks of this many (4 MiB, 65 s), each its own allocation, joined once at the end.
BLOCK_SAMPLES = 2**20
# What decoded audio costs the HTTP process per second it holds (16 kHz float32: 62.5 KiB), and what a file costs
# besides while it decodes and its speech is found (a block of samples, the detector's block and working memory).
# Measured by bench/audio_memory.py (62.9 KiB a second and 8.6 MiB), asserted on a real server by
# tests/test_hostile_audio.py.
DECODED_BYTES_PER_SECOND = 4 * SAMPLE_RATE
DECODING_BYTES_PER_FILE = 16 * 2**20


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def map_large_buffers() -> None:
    """Makes glibc map every buffer of 1 MiB or more on its own, so freeing one gives its memory back. By default
    glibc raises that threshold to the size of each large buffer freed (up to 32 MiB); from then on decoded audio's
    blocks come from the heap and stay resident after they are freed: 123 KiB a second of audio instead of 64
    (bench/audio_memory.py). Nothing on other C libraries."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 2**20)
    except (OSError, AttributeError):
        pass


class AudioError(Exception):
    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class SampleBuffer:
    """Decoded samples in blocks, joined into one array block by block, each freed as it is copied: the audio costs
    itself plus one block, where a list of frames and np.concatenate cost it twice at the end."""

    def __init__(self) -> None:
        self.blocks: list[np.ndarray] = []
        self.total = self.filled = 0  # samples in all, and in the last block
        self.not_finite = 0

    def append(self, chunk: np.ndarray) -> None:
        self.not_finite += len(chunk) - int(np.count_nonzero(np.isfinite(chunk)))
        while len(chunk):
            if not self.blocks or self.filled == BLOCK_SAMPLES:
                self.blocks.append(np.empty(BLOCK_SAMPLES, np.float32))
                self.filled = 0
            taken = min(len(chunk), BLOCK_SAMPLES - self.filled)
            self.blocks[-1][self.filled:self.filled + taken] = chunk[:taken]
            self.filled += taken
            self.total += taken
            chunk = chunk[taken:]

    def join(self) -> np.ndarray:
        samples = np.empty(self.total, np.float32)
        position = 0
        while self.blocks:
            block = self.blocks.pop(0)[:self.total - position]
            samples[position:position + len(block)] = block
            position += len(block)
            del block
        return samples


def check_rate(rate: int | None) -> None:
    if rate is not None and 0 < rate < MIN_SAMPLE_RATE:
        raise AudioError(400, f"The audio's sample rate is {rate} Hz; the server accepts {MIN_SAMPLE_RATE} Hz and above "
                              "(no speech recording uses less).", "unsupported_sample_rate")


def decode_audio(path: str, max_seconds: float, max_seconds_per_mb: float = float("inf"),
                 on_samples: Callable[[int], None] = lambda total: None) -> np.ndarray:
    """Decodes any container/codec ffmpeg knows to 16 kHz mono float32, stopping as soon as it passes max_seconds or
    max_seconds_per_mb of the file's size. `on_samples` hears the count decoded so far after each chunk, and may stop
    the decoding by raising."""
    upload_bytes = os.path.getsize(path)
    longest = min(max_seconds, upload_bytes / 2**20 * max_seconds_per_mb)
    too_long = AudioError(400, f"The audio is longer than the maximum of {max_seconds:g} seconds.", "audio_too_long")
    if longest < max_seconds:
        too_long = AudioError(400, f"The file decodes to more than {longest:.1f} s of audio from {upload_bytes} bytes; "
                                   f"the server decodes at most {max_seconds_per_mb:g} s per MB uploaded (far below "
                                   "any speech codec's bit rate).", "audio_too_long_for_upload")
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
        check_rate(stream.codec_context.sample_rate)
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        max_samples = int(longest * SAMPLE_RATE)
        buffer = SampleBuffer()
        try:
            for frame in container.decode(stream):
                check_rate(frame.sample_rate)  # a stream may change rate part-way, whatever its header said
                for resampled in resampler.resample(frame):
                    buffer.append(resampled.to_ndarray().reshape(-1))
                if buffer.total > max_samples:
                    raise too_long
                on_samples(buffer.total)
            for resampled in resampler.resample(None):
                buffer.append(resampled.to_ndarray().reshape(-1))
            on_samples(buffer.total)
        except av.error.FFmpegError as error:
            if not buffer.total:
                raise AudioError(400, f"The audio could not be decoded: {error.strerror or error}.", "invalid_audio") from error
            # A damaged tail still yields the audio before it, as ffmpeg does.
    if buffer.total > max_samples:
        raise too_long
    if buffer.total < SAMPLE_RATE // 100:
        raise AudioError(400, "The file contains no audio samples (empty or truncated).", "empty_audio")
    if buffer.not_finite:
        raise AudioError(400, f"The audio has {buffer.not_finite} samples that are not finite numbers (NaN or infinity); "
                              "a float file must hold real sample values.", "non_finite_audio")
    return buffer.join()
