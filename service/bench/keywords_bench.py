"""What keywords[] (vocabulary biasing: the words in every window's prompt) does to names, on OpenAI's real tiny.en:
espeak-ng sentences with unusual proper names, decoded without keywords, with each clip's own names, and with every
clip's own names and the next two clips' (a glossary, mostly of names the clip does not hold); plus the held-out
sentences of the real-weights tests (no names in them) without and with a glossary, for what keywords cost where
they do not apply.

    python service/bench/keywords_bench.py [--checkpoint DIR]

The checkpoint is tiny.en converted by `whisper-server convert-ct2` (the tests' test-artifacts/tiny.en-hf-*, made by
any real-weights test run). Each clip is one window, decoded greedily without timestamps (as json answers are) by the
server's slot engine in this process on CPU. Prints name accuracy (a name counts when its words are in the
transcript, in order) and WER per condition.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from speech import Clip, SpeechClips, corpus_word_error_rate, normalize_words  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
# Sentences and the names in them.
NAMED = [
    ("Doctor Xiomara Vandersloot arrived in Tallahassee on Monday.", ["Xiomara", "Vandersloot", "Tallahassee"]),
    ("Please forward the invoice to Siobhan Okonkwo before noon.", ["Siobhan", "Okonkwo"]),
    ("The meeting with Gwendolyn Przybylski starts at nine.", ["Gwendolyn", "Przybylski"]),
    ("Our new intern, Thaddeus Quimby, lives in Schenectady.", ["Thaddeus", "Quimby", "Schenectady"]),
    ("Ask Ngozi Adeyemi about the Kubernetes migration.", ["Ngozi", "Adeyemi", "Kubernetes"]),
    ("The package from Oyelaran Logistics reached Poughkeepsie today.", ["Oyelaran", "Poughkeepsie"]),
    ("Zbigniew wrote a long letter to Anneliese Vogelsang.", ["Zbigniew", "Anneliese", "Vogelsang"]),
    ("Captain Ignatius Featherstone sailed from Llandudno at dawn.", ["Ignatius", "Featherstone", "Llandudno"]),
    ("Kwabena Asante flew from Accra to Reykjavik with Saoirse.", ["Kwabena", "Asante", "Accra", "Reykjavik",
                                                                   "Saoirse"]),
    ("The Karpenter controller and the Pulumi program run on Graviton nodes.", ["Karpenter", "Pulumi", "Graviton"]),
    ("Leocadia Szymanska bought a cottage near Auchtermuchty.", ["Leocadia", "Szymanska", "Auchtermuchty"]),
    ("Send the draft to Evander Mbeki and Ottoline Marchbanks.", ["Evander", "Mbeki", "Ottoline", "Marchbanks"]),
]


def glossary(index: int) -> tuple[str, ...]:
    """The names of clip `index` and of the two after it."""
    return tuple(name for offset in range(3) for name in NAMED[(index + offset) % len(NAMED)][1])


def named_clips(clips: SpeechClips) -> list[Clip]:
    """One clip per named sentence, in the test clips' voices and speeds."""
    return [clips._clip(f"names-{index:02d}", lambda index=index, text=text: clips._join([text], index, 0.0))
            for index, (text, _) in enumerate(NAMED)]


def names_found(names: list[str], text: str) -> int:
    words = normalize_words(text)
    return sum(normalize_words(name)[0] in words for name in names)


def transcribe(engine, clip: Clip, keywords: tuple[str, ...]) -> str:
    from whisper_server.decoding import DecodeOptions

    slots = engine.admit([(clip.samples(), DecodeOptions(timestamps=False, keywords=keywords))])
    results = {}
    while engine.busy_slots():
        results.update(engine.step())
    return " ".join(segment.text for segment in results[slots[0]].segments).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    found = sorted(ARTIFACTS.glob("tiny.en-hf-*"))
    parser.add_argument("--checkpoint", type=Path, default=found[-1] if found else None)
    args = parser.parse_args()
    if args.checkpoint is None:
        parser.error("no converted tiny.en under test-artifacts/: pass --checkpoint")
    import torch
    from whisper_server.engine import WhisperEngine

    torch.set_num_threads(1)
    engine = WhisperEngine(str(args.checkpoint), device="cpu", dtype="float32", offline=True, slots=1)
    engine.load()
    clips = SpeechClips(ARTIFACTS / "speech")
    named = named_clips(clips)
    print("| clips | keywords | names right | WER |")
    print("| --- | --- | ---: | ---: |")
    total = sum(len(names) for _, names in NAMED)
    for label, keywords_of in (("none", lambda index: ()), ("the clip's own names", lambda index: NAMED[index][1]),
                               ("its names and 2 other clips'", glossary)):
        texts = [transcribe(engine, clip, tuple(keywords_of(index))) for index, clip in enumerate(named)]
        right = sum(names_found(names, text) for text, (_, names) in zip(texts, NAMED))
        wer = corpus_word_error_rate([clip.text for clip in named], texts)
        print(f"| {len(named)} with names | {label} | {right}/{total} ({right / total:.0%}) | {wer:.1%} |",
              flush=True)
    plain = clips.short()
    for label, keywords_of in (("none", lambda index: ()), ("3 clips' names", glossary)):
        texts = [transcribe(engine, clip, keywords_of(index)) for index, clip in enumerate(plain)]
        wer = corpus_word_error_rate([clip.text for clip in plain], texts)
        print(f"| {len(plain)} held out, no names | {label} | - | {wer:.1%} |", flush=True)


if __name__ == "__main__":
    main()
