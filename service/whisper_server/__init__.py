"""OpenAI-compatible Whisper speech server."""
