"""Speech with known text, for the real-weights tests and the benchmark: espeak-ng speaks the sentences of
data/sentences.txt, ffmpeg resamples them to 16 kHz mono, and each clip keeps its reference beside it (the text and
every sentence's start and end in seconds, in `<name>.json` next to `<name>.wav`).

    from speech import SpeechClips, word_error_rate

    clips = SpeechClips(folder)                 # folder: where the WAVs go (reused when already made)
    for clip in clips.short():                  # one sentence each, 0.3 s of silence either side
        clip.path, clip.text, clip.duration, clip.sentences   # Sentence(text, start, end)
    clips.long(pause=0.7)                       # 60-90 s: sentences with 0.7 s pauses (0.25 s: fluent speech)
    clips.quiet()                               # a 40 s clip 40 dB down, as from a far microphone
    clips.silence(), clips.noise()              # 10 s each; no words are expected from either
    clips.foreign_short("de", count=4)          # other languages (data/multilingual.txt): clip.language, and
    clips.foreign_long("de")                    # clip.english, the English translation; 40 s long clips
    clips.foreign_short("de", split="held out") # data/multilingual-held-out.txt: for judging, never for tuning
    clips.foreign_short("de", split="held out 2")  # data/multilingual-held-out-2.txt: a second, larger judging set
    clip.samples()                              # float32 at 16 kHz, exactly what the WAV holds
    word_error_rate(clip.text, transcript)      # normalised words, Levenshtein distance / reference words
    aligned_words(reference_words, words)       # which word went where (None: deleted or inserted)
    corpus_word_error_rate(references, texts)   # the same over many clips together

Every clip is made from the held-out sentences unless `split="development"` is asked for: anything tuned on speech
(voice activity thresholds, decoding rules) is tuned on the development sentences and judged on held-out ones.
Clips are deterministic: the same names always hold the same audio (voices, speeds and orders come from fixed seeds).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import unicodedata
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16_000
SENTENCES_FILE = Path(__file__).parent / "data" / "sentences.txt"
# Sentences in other languages, each with its English translation; its sections are ISO-639-1 codes and voices. The
# tests speak the development file (what tuning may look at); the held-out one judges the result.
FOREIGN_FILES = {"development": Path(__file__).parent / "data" / "multilingual.txt",
                 "held out": Path(__file__).parent / "data" / "multilingual-held-out.txt",
                 "held out 2": Path(__file__).parent / "data" / "multilingual-held-out-2.txt"}
# espeak-ng voices and speeds (words per minute), cycled over the sentences: several accents, male and female.
VOICES = ("en-us", "en-gb", "en-us+f3", "en-gb-x-rp", "en-us+m3", "en-gb+f2")
SPEEDS = (165, 150, 175, 160)
EDGE_SILENCE_SECONDS = 0.3
QUIET_DB = -40.0
# Samples quieter than this at a sentence's edges are espeak-ng's own lead-in and tail, trimmed so onsets are exact.
TRIM_LEVEL = 1e-3


def load_sentences(path: Path = SENTENCES_FILE) -> dict[str, list[str]]:
    """The corpus: {"development": [...], "held out": [...]}, in file order."""
    splits: dict[str, list[str]] = {}
    current = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = splits.setdefault(line[1:-1], [])
        elif current is None:
            raise ValueError(f"{path}: a sentence before the first [section]")
        else:
            current.append(line)
    return splits


def load_foreign(path: Path = FOREIGN_FILES["development"]) -> dict[str, list[tuple[str, str]]]:
    """{language: [(sentence, English translation)]}, in file order (data/multilingual.txt)."""
    return {language: [tuple(part.strip() for part in line.split(" | ")) for line in lines]
            for language, lines in load_sentences(path).items()}


def normalize_words(text: str) -> list[str]:
    """Lower case, punctuation dropped (hyphens split words), letters of every script kept with their combining marks
    (Thai and Devanagari vowels and tones are marks: a word split at them counts as many words): what a word error
    rate compares."""
    return "".join(c if c.isalnum() or c == "'" or unicodedata.category(c).startswith("M") else " "
                   for c in text.lower().replace("-", " ")).split()


def aligned_words(reference: list[str], hypothesis: list[str]) -> list[tuple[int | None, int | None]]:
    """A minimal edit alignment (Levenshtein) of two word sequences, in order: (reference index, hypothesis index)
    for a match or a substitution, (index, None) for a deleted reference word, (None, index) for an inserted one."""
    cost = np.zeros((len(reference) + 1, len(hypothesis) + 1), np.int32)
    cost[:, 0], cost[0, :] = np.arange(len(reference) + 1), np.arange(len(hypothesis) + 1)
    for i, word in enumerate(reference, 1):
        for j, other in enumerate(hypothesis, 1):
            cost[i, j] = min(cost[i - 1, j] + 1, cost[i, j - 1] + 1, cost[i - 1, j - 1] + (word != other))
    pairs, i, j = [], len(reference), len(hypothesis)
    while i or j:
        if i and j and cost[i, j] == cost[i - 1, j - 1] + (reference[i - 1] != hypothesis[j - 1]):
            i, j = i - 1, j - 1
            pairs.append((i, j))
        elif i and cost[i, j] == cost[i - 1, j] + 1:
            i -= 1
            pairs.append((i, None))
        else:
            j -= 1
            pairs.append((None, j))
    return pairs[::-1]


def word_errors(reference: str, hypothesis: str) -> int:
    """Substitutions, insertions and deletions between the normalised word sequences (Levenshtein distance)."""
    ref, hyp = normalize_words(reference), normalize_words(hypothesis)
    return sum(r is None or h is None or ref[r] != hyp[h] for r, h in aligned_words(ref, hyp))


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word errors over the reference's word count (a reference with no words: 0 for no words, else inf)."""
    words = len(normalize_words(reference))
    errors = word_errors(reference, hypothesis)
    return errors / words if words else (0.0 if errors == 0 else float("inf"))


def corpus_word_error_rate(references: list[str], hypotheses: list[str]) -> float:
    """Word errors over every clip together, over their reference words (longer clips weigh more)."""
    return (sum(word_errors(r, h) for r, h in zip(references, hypotheses))
            / sum(len(normalize_words(r)) for r in references))


@dataclass(frozen=True)
class Sentence:
    text: str
    start: float
    end: float


@dataclass(frozen=True)
class Clip:
    name: str
    path: Path
    sentences: tuple[Sentence, ...]
    duration: float
    language: str = "en"
    english: str | None = None  # the English translation, for clips in other languages

    @property
    def text(self) -> str:
        return " ".join(sentence.text for sentence in self.sentences)

    def samples(self) -> np.ndarray:
        return read_wav(self.path)


def write_wav(path: Path, samples: np.ndarray) -> None:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1), out.setsampwidth(2), out.setframerate(SAMPLE_RATE)
        out.writeframes(np.round(np.clip(samples, -1, 32767 / 32768) * 32768).astype("<i2").tobytes())


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as source:
        if (source.getnchannels(), source.getframerate(), source.getsampwidth()) != (1, SAMPLE_RATE, 2):
            raise ValueError(f"{path} is not 16 kHz 16-bit mono")
        return np.frombuffer(source.readframes(source.getnframes()), "<i2").astype(np.float32) / 32768


class SpeechClips:
    """Makes clips on first use into `folder` (under a key of the corpus, voices and tools, so a change remakes them)
    and returns them from there afterwards."""

    def __init__(self, folder: str | Path):
        for tool in ("espeak-ng", "ffmpeg"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} is required for speech clips (apt-get install espeak-ng ffmpeg)")
        self.corpus = load_sentences()
        self.foreign = {split: load_foreign(path) for split, path in FOREIGN_FILES.items()}
        espeak = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True).stdout
        key = hashlib.sha256(json.dumps([self.corpus, self.foreign, VOICES, SPEEDS, espeak,
                                         Path(__file__).read_text()]).encode())
        self.folder = Path(folder) / key.hexdigest()[:16]
        self.folder.mkdir(parents=True, exist_ok=True)
        self._spoken: dict[tuple[str, int], np.ndarray] = {}

    def sentences(self, split: str = "held out") -> list[str]:
        return self.corpus[split]

    def speak(self, text: str, index: int, voice: str | None = None) -> np.ndarray:
        """One sentence at 16 kHz, espeak-ng's edge silence trimmed; the speed (and the English voice unless one is
        given) follows from `index`."""
        if (text, index, voice) not in self._spoken:
            voice, speed = voice or VOICES[index % len(VOICES)], SPEEDS[index % len(SPEEDS)]
            wav = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "--stdout", text],
                                 check=True, capture_output=True).stdout
            pcm = subprocess.run(["ffmpeg", "-loglevel", "error", "-i", "pipe:0", "-ar", str(SAMPLE_RATE), "-ac", "1",
                                  "-f", "s16le", "pipe:1"], input=wav, check=True, capture_output=True).stdout
            samples = np.frombuffer(pcm, "<i2").astype(np.float32) / 32768
            voiced = np.flatnonzero(np.abs(samples) > TRIM_LEVEL)
            self._spoken[text, index, voice] = samples[voiced[0]:voiced[-1] + 1]
        return self._spoken[text, index, voice]

    def _clip(self, name: str, build, language: str = "en", english: str | None = None) -> Clip:
        wav, reference = self.folder / f"{name}.wav", self.folder / f"{name}.json"
        if not (wav.is_file() and reference.is_file()):
            samples, sentences = build()
            write_wav(wav.with_suffix(".tmp"), samples)
            wav.with_suffix(".tmp").rename(wav)
            reference.write_text(json.dumps({
                "text": " ".join(s.text for s in sentences), "duration": len(samples) / SAMPLE_RATE,
                "sentences": [s.__dict__ for s in sentences], "language": language, "english": english},
                indent=1, ensure_ascii=False))
        meta = json.loads(reference.read_text())
        return Clip(name, wav, tuple(Sentence(**s) for s in meta["sentences"]), meta["duration"], meta["language"],
                    meta["english"])

    def _join(self, texts: list[str], first_index: int, pause: float, gain: float = 1.0, voice: str | None = None):
        """Sentences one after another with `pause` seconds between them and edge silence around them."""
        edge = np.zeros(int(EDGE_SILENCE_SECONDS * SAMPLE_RATE), np.float32)
        gap = np.zeros(int(round(pause * SAMPLE_RATE)), np.float32)
        parts, sentences, at = [edge], [], len(edge)
        for offset, text in enumerate(texts):
            spoken = self.speak(text, first_index + offset, voice)
            if offset:
                parts.append(gap)
                at += len(gap)
            sentences.append(Sentence(text, round(at / SAMPLE_RATE, 3), round((at + len(spoken)) / SAMPLE_RATE, 3)))
            parts.append(spoken)
            at += len(spoken)
        parts.append(edge)
        return np.concatenate(parts) * np.float32(gain), sentences

    def short(self, split: str = "held out", count: int | None = None) -> list[Clip]:
        """One clip per sentence (the first `count` of the split)."""
        texts = self.sentences(split)[:count]
        tag = split.replace(" ", "-")
        return [self._clip(f"short-{tag}-{i:02d}", lambda i=i, text=text: self._join([text], i, 0.0))
                for i, text in enumerate(texts)]

    def long(self, pause: float = 0.7, split: str = "held out", seconds: float = 75.0, seed: int = 0) -> Clip:
        """About `seconds` (60-90 s) of the split's sentences in a seeded order, `pause` seconds apart; sentences
        repeat only once the split is used up."""
        texts = self._texts_for(split, seconds, pause, seed)
        name = f"long-{split.replace(' ', '-')}-{pause:.2f}s-{seconds:.0f}s-seed{seed}"
        return self._clip(name, lambda: self._join(texts, seed * 7, pause))

    def quiet(self, split: str = "held out", seconds: float = 40.0, seed: int = 1) -> Clip:
        """A clip 40 dB below espeak-ng's level (peaks near -40 dBFS), 0.7 s pauses."""
        texts = self._texts_for(split, seconds, 0.7, seed)
        name = f"quiet-{split.replace(' ', '-')}-{seconds:.0f}s-seed{seed}"
        return self._clip(name, lambda: self._join(texts, seed * 7, 0.7, gain=10 ** (QUIET_DB / 20)))

    def silence(self, seconds: float = 10.0) -> Clip:
        return self._clip(f"silence-{seconds:.0f}s", lambda: (np.zeros(int(seconds * SAMPLE_RATE), np.float32), []))

    def noise(self, seconds: float = 10.0, level_db: float = -30.0) -> Clip:
        """White noise at `level_db` dBFS RMS."""
        def build():
            noise = np.random.default_rng(7).normal(0, 10 ** (level_db / 20), int(seconds * SAMPLE_RATE))
            return noise.astype(np.float32), []
        return self._clip(f"noise-{seconds:.0f}s{level_db:.0f}dB", build)

    def foreign_short(self, language: str, count: int | None = None, split: str = "development") -> list[Clip]:
        """One clip per sentence of `language` in the split's file (the first `count`), in its espeak-ng voice."""
        pairs, tag = self.foreign[split][language][:count], self._foreign_tag(split)
        return [self._clip(f"short-{language}{tag}-{i:02d}", lambda i=i, text=text: self._join([text], i, 0.0, voice=language),
                           language, english) for i, (text, english) in enumerate(pairs)]

    def foreign_long(self, language: str, pause: float = 0.7, seconds: float = 40.0, seed: int = 0,
                     split: str = "development") -> Clip:
        """About `seconds` of `language`'s sentences in a seeded order, `pause` seconds apart (two windows or more)."""
        pairs = dict(self.foreign[split][language])
        texts = self._texts_for(list(pairs), seconds, pause, seed, voice=language)
        return self._clip(f"long-{language}{self._foreign_tag(split)}-{pause:.2f}s-{seconds:.0f}s-seed{seed}",
                          lambda: self._join(texts, seed * 7, pause, voice=language), language,
                          " ".join(pairs[text] for text in texts))

    @staticmethod
    def _foreign_tag(split: str) -> str:
        return "" if split == "development" else "-" + split.replace(" ", "-")

    def _texts_for(self, pool: str | list[str], seconds: float, pause: float, seed: int,
                   voice: str | None = None) -> list[str]:
        """Sentences of a split (or a list) in a seeded order until their spoken length (with pauses) reaches
        `seconds`."""
        pool = self.sentences(pool) if isinstance(pool, str) else pool
        order = np.random.default_rng(seed).permutation(len(pool))
        texts, total = [], 2 * EDGE_SILENCE_SECONDS
        while total < seconds:
            index = order[len(texts) % len(pool)]
            total += (len(self.speak(pool[index], seed * 7 + len(texts), voice)) / SAMPLE_RATE
                      + (pause if texts else 0.0))
            texts.append(pool[index])
        return texts
