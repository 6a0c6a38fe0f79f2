"""The `language` and `languages[]` fields of a request: ISO-639-1 codes or English names (`german`, and OpenAI's
aliases such as `castilian`), as OpenAI's Whisper accepts them, checked against what the loaded checkpoint knows."""

from __future__ import annotations

from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

from .decoding import Capabilities
from .errors import ApiError


def language_name(code: str | None) -> str:
    """The English name OpenAI's verbose_json gives a language (`en` -> `english`)."""
    return LANGUAGES.get(code, code or "unknown")


def parse_language(value: str, capabilities: Capabilities, param: str = "language") -> str:
    """A language code or name, as the checkpoint's ISO-639-1 code; a 400 that lists the valid values otherwise."""
    text = value.strip().lower()
    code = TO_LANGUAGE_CODE.get(text, text)
    if code in capabilities.languages:
        return code
    if not capabilities.multilingual:
        raise ApiError(400, f"This model is English-only: {param} must be 'en' (or 'english') or left out; got "
                       f"'{value}'.", param=param, code="unsupported_language")
    valid = ", ".join(f"{known} ({LANGUAGES.get(known, known)})" for known in capabilities.languages)
    raise ApiError(400, f"{param} must be a language the model knows, as an ISO-639-1 code or its English name; got "
                   f"'{value}'. Valid values: {valid}.", param=param, code="invalid_language")
