"""Say what a death by signal means, in one line (stdlib only).

Why: a llama.cpp built for CPU features the host does not run (on AMX hosts, ggml's AMX path; llama.cpp #28756)
dies by SIGILL; a program that dies by a signal writes no trace, and "decoded no MoE model" would hide the cause.
"""

from __future__ import annotations

import signal

REBUILD_HINT = ("rebuild llama.cpp for this CPU without ggml's AMX path: for llama-cpp-python `python3 -m "
                "gguf_experts.native_build install`; for a llama.cpp you build with cmake, add the flags that "
                "`python3 -m gguf_experts.native_build cmake-args` prints (see README, Set-up)")

_MEANING: dict[int, str] = {
    signal.SIGILL: ("an illegal instruction: the program was built for CPU features this machine does not run "
                    "(on hosts with AMX, llama.cpp's AMX matmul dies so); " + REBUILD_HINT),
    signal.SIGSEGV: "a segmentation fault (a bug, or a library built for another version: its stderr above may say)",
    signal.SIGBUS: ("a bus error: usually a memory-mapped file was truncated or replaced while in use "
                    "(is the model file complete and left alone?)"),
    signal.SIGABRT: "an abort: llama.cpp stops so on a failed GGML_ASSERT; its stderr above says which",
    signal.SIGKILL: ("killed outright: often the kernel's out-of-memory killer (dmesg says), or someone ran "
                     "kill -9"),
    signal.SIGFPE: "an arithmetic fault (e.g. an integer division by zero)",
}


def signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def describe_signal(sig: int, program: str) -> str:
    """``PROGRAM was killed by SIGILL (...meaning...; what to do)``; plain for signals without a known meaning."""
    text = f"{program} was killed by {signal_name(sig)}"
    meaning = _MEANING.get(sig)
    return f"{text}: {meaning}" if meaning else text


def signal_of_status(returncode: int) -> int | None:
    """The signal that ended a child, from subprocess's return code (negative), else None."""
    return -returncode if returncode < 0 else None
