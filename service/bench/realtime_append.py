"""The largest live append (OpenAI's 15 MiB of base64 JSON) and the event loop: how long handling one holds the loop,
which every live session of the process shares. The naive way (base64.b64decode of the whole string) beside the
server's (realtime.decode_base64, a piece at a time), in the same run; both parse the JSON the same way, in one call.
A ticker on the loop measures the longest it went without running. A few seconds, one core:
    python service/bench/realtime_append.py
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import statistics
import time

from whisper_server.realtime import decode_base64

MESSAGE_MIB = 15
RUNS = 5


async def longest_stall(handle) -> tuple[float, float]:
    """(the longest gap between the ticker's turns while `handle()` ran, how long it ran), seconds."""
    longest, running = 0.0, True

    async def ticker() -> None:
        nonlocal longest
        last = time.perf_counter()
        while running:
            await asyncio.sleep(0)
            now = time.perf_counter()
            longest, last = max(longest, now - last), now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    started = time.perf_counter()
    await handle()
    took = time.perf_counter() - started
    running = False
    await task
    return longest, took


def main() -> None:
    audio = base64.b64encode(os.urandom(MESSAGE_MIB * 2**20 * 3 // 4 - 96)).decode()
    text = json.dumps({"type": "input_audio_buffer.append", "audio": audio})
    timings: dict[str, list[tuple[float, float]]] = {"json.loads": [], "json.loads + b64decode (whole)": [],
                                                     "json.loads + decode_base64 (pieces)": []}

    async def parse() -> None:
        json.loads(text)

    async def whole() -> None:
        base64.b64decode(json.loads(text)["audio"], validate=True)

    async def pieces() -> None:
        await decode_base64(json.loads(text)["audio"])

    async def run() -> None:
        for _ in range(RUNS):
            for name, handle in zip(timings, (parse, whole, pieces)):
                timings[name].append(await longest_stall(handle))

    asyncio.run(run())
    print(f"one {len(text) / 2**20:.1f} MiB input_audio_buffer.append, median of {RUNS} runs")
    print("| handling | longest event-loop stall ms | total ms |\n| --- | ---: | ---: |")
    for name, runs in timings.items():
        print(f"| {name} | {1000 * statistics.median(stall for stall, _ in runs):.1f} | "
              f"{1000 * statistics.median(took for _, took in runs):.1f} |")


if __name__ == "__main__":
    main()
