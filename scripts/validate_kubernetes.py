"""Validates Kubernetes objects strictly (a field the API does not know is an error) at one Kubernetes version with
kubernetes-validate: reads {"version": "1.35", "objects": [...]} as JSON on stdin and writes a JSON list with, for each
object, its first problem or null. Run with the tools virtualenv's python (scripts/tools.ts)."""

from __future__ import annotations

import json
import sys

import kubernetes_validate


def problem(obj: dict, version: str) -> str | None:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error.absolute_path)
        return f"{where or '.'}: {error.message} (Kubernetes {version}, strict)"
    except kubernetes_validate.SchemaNotFoundError as error:
        return error.message
    return None


def main() -> int:
    request = json.load(sys.stdin)
    json.dump([problem(obj, request["version"]) for obj in request["objects"]], sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
