#!/usr/bin/env python
"""A cold-start sanity check of `run --paging` (no memory pressure): for each mode, evict the model from the
page cache (posix_fadvise DONTNEED), start llama-server under `gguf-experts run --paging MODE --no-trace`, send
the same requests, and print per request: prefill and decode time (the server's own timings) and the bytes
the server read (/proc/PID/io read_bytes), with ratios against stock measured in the same run.

This is not the issue-19 harness (that one limits the page cache); it shows the mechanics on a model that fits:
stock reads the whole file at load, the modes read what the requests use.

    python scripts/paging_coldstart.py MODEL.gguf [--modes stock,random,prefetch] [--requests 2] [--n-predict 8]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
          "movable metal type, oil-based inks and a screw press adapted from wine making. Within a few decades "
          "presses had spread to more than two hundred cities across Europe, books became cheaper, literacy rose, "
          "and scholars could compare identical copies of the same text for the first time. Historians still "
          "argue about how quickly these changes reached ordinary people, and why some regions adopted the new "
          "technology so much faster than others, but nearly all agree that")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def one_mode(bin_dir: Path, model: Path, mode: str, requests: int, n_predict: int, env: dict[str, str]
             ) -> list[dict[str, Any]]:
    evict(model)
    port = free_port()
    cmd = [sys.executable, "-m", "gguf_experts", "run", "--paging", mode, "--no-trace", "--",
           str(bin_dir / "llama-server"), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
           "-t", "2", "-c", "2048", "--parallel", "1", "--no-warmup", "--no-webui"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env})
    out = []
    try:
        t0 = time.time()
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() - t0 > 600:
                raise SystemExit(f"{mode}: llama-server did not start: {proc.stderr.read() if proc.stderr else ''}")
            time.sleep(0.2)
        load_s = time.time() - t0
        kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        pid = int(kids[0])
        before = read_bytes(pid)
        out.append({"mode": mode, "request": "load", "seconds": round(load_s, 2), "read_GB": round(before / 1e9, 3)})
        for i in range(requests):
            b0 = read_bytes(pid)
            body = {"prompt": PROMPT, "n_predict": n_predict, "temperature": 0, "cache_prompt": False}
            req = urllib.request.Request(f"http://127.0.0.1:{port}/completion", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=1200) as r:
                t = json.loads(r.read())["timings"]
            out.append({"mode": mode, "request": i, "prompt_tokens": t["prompt_n"],
                        "prefill_s": round(t["prompt_ms"] / 1000, 2),
                        "decode_s_per_token": round(t["predicted_per_token_ms"] / 1000, 3),
                        "read_GB": round((read_bytes(pid) - b0) / 1e9, 3)})
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--modes", default="stock,random,prefetch")
    ap.add_argument("--requests", type=int, default=2)
    ap.add_argument("--n-predict", type=int, default=8)
    a = ap.parse_args()
    r = subprocess.run(["bash", str(Path(__file__).parent / "build_llama_tools.sh")], capture_output=True, text=True,
                       check=True)
    bin_dir = Path(r.stdout.strip().splitlines()[-1])
    rows: list[dict[str, Any]] = []
    for spec in a.modes.split(","):
        mode, _, extra = spec.partition(":")  # e.g. prefetch:GGUF_EXPERTS_PREFETCH_ASYNC=0
        env = {"GGUF_EXPERTS_PAGING_LOAD": "skip"}  # the model fits here: drop the load pass as if it did not
        env.update(dict(kv.split("=", 1) for kv in extra.split(";") if kv))
        rows += [{**x, "variant": spec} for x in one_mode(bin_dir, a.model, mode, a.requests, a.n_predict, env)]
    base = {x["request"]: x for x in rows if x["variant"] == "stock"}
    for x in rows:
        b = base.get(x["request"])
        if b and "prefill_s" in x and x["prefill_s"]:
            x["prefill_vs_stock"] = round(b["prefill_s"] / x["prefill_s"], 2)
            x["decode_vs_stock"] = round(b["decode_s_per_token"] / x["decode_s_per_token"], 2)
        print(json.dumps(x))
    return 0


if __name__ == "__main__":
    sys.exit(main())
