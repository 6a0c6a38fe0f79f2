#!/usr/bin/env python3
"""Creates or reuses a project-local virtual environment and installs locked requirements into it, again only when
what it installs has changed (the requirement files, the local projects, the interpreter).

Each requirements file is a lock: the full closure, pinned. Each is installed in its own pip call with --no-deps, so an
index a file names (PyTorch's CPU index) is asked only for that file's packages, then `pip check` proves the closure.

    scripts/python-env.sh VENV_DIR REQUIREMENTS_FILE... [-- MORE_PIP_INSTALL_ARGS...]
    scripts/python-env.sh .venv service/requirements-torch-cpu.txt service/requirements-test.txt -- -e ./service

Runs on the system interpreter with the standard library only: it never installs into that interpreter (Debian and
Ubuntu refuse it, PEP 668). PYTHON names the interpreter the environment is built from (default: this one).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

STAMP = ".installed-from"
MINIMUM_PYTHON = (3, 10)


def fail(message: str) -> None:
    print(f"python-env: {message}", file=sys.stderr)
    sys.exit(1)


def requirement_files(path: Path, seen: set[Path]) -> list[Path]:
    """The file and every file it includes with -r/-c, which pip reads relative to the including file."""
    path = path.resolve()
    if path in seen:
        return []
    if not path.is_file():
        fail(f"requirements file {path} does not exist")
    seen.add(path)
    found = [path]
    for line in path.read_text().splitlines():
        parts = line.split("#", 1)[0].split()
        if len(parts) == 2 and parts[0] in ("-r", "--requirement", "-c", "--constraint"):
            found += requirement_files(path.parent / parts[1], seen)
    return found


def fingerprint(interpreter: str, pip_args: list[str]) -> str:
    """Hash of the interpreter's version, the pip arguments and every file they install from."""
    digest = hashlib.sha256()
    version = subprocess.run([interpreter, "-c", "import sys; print(sys.version)"], capture_output=True, text=True,
                             check=True).stdout
    digest.update(version.encode())
    seen: set[Path] = set()
    for index, arg in enumerate(pip_args):
        digest.update(arg.encode() + b"\0")
        previous = pip_args[index - 1] if index else ""
        if previous in ("-r", "--requirement", "-c", "--constraint"):
            files = requirement_files(Path(arg), seen)
        elif previous in ("-e", "--editable") or Path(arg).is_dir():
            files = [Path(arg) / name for name in ("pyproject.toml", "setup.cfg", "setup.py") if (Path(arg) / name).is_file()]
        else:
            files = []
        for file in files:
            digest.update(file.read_bytes())
    return digest.hexdigest()


def main() -> None:
    if len(sys.argv) < 3:
        fail("usage: python-env.sh VENV_DIR REQUIREMENTS_FILE... [-- MORE_PIP_INSTALL_ARGS...]")
    venv, rest = Path(sys.argv[1]), sys.argv[2:]
    files, extra = (rest[:rest.index("--")], rest[rest.index("--") + 1:]) if "--" in rest else (rest, [])
    pip_calls = [["-r", file] for file in files] + ([extra] if extra else [])
    interpreter = os.environ.get("PYTHON") or sys.executable
    probe = subprocess.run([interpreter, "-c", "import sys, venv, ensurepip; print(*sys.version_info[:2])"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        fail(f"{interpreter} cannot create virtual environments (no venv/ensurepip module). Install it:\n"
             "  Debian/Ubuntu: sudo apt-get install python3-venv\n  macOS: brew install python@3.12")
    if tuple(map(int, probe.stdout.split())) < MINIMUM_PYTHON:
        fail(f"{interpreter} is Python {probe.stdout.strip().replace(' ', '.')}; the tests need "
             f"{'.'.join(map(str, MINIMUM_PYTHON))} or newer (set PYTHON=/path/to/python3.11, for example)")

    wanted = fingerprint(interpreter, [arg for call in pip_calls for arg in call])
    stamp = venv / STAMP
    python = venv / "bin" / "python"
    if python.exists() and stamp.is_file() and stamp.read_text().strip() == wanted:
        return
    print(f"python-env: setting up {venv} (once, and again only when its requirements change)", file=sys.stderr)
    if venv.exists():
        shutil.rmtree(venv)  # from scratch: packages a changed lock dropped must not linger
    subprocess.run([interpreter, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
    for call in pip_calls:
        if subprocess.run([*pip, "install", "--quiet", "--no-deps", *call]).returncode != 0:
            fail(f"installing {' '.join(call)} into {venv} failed (see pip's message above); the next run retries")
    if subprocess.run([*pip, "check"]).returncode != 0:
        fail("the locked requirements are not a complete closure (see pip check above): add what is missing")
    stamp.write_text(wanted + "\n")


if __name__ == "__main__":
    main()
