"""gguf-experts forecast: disk bytes, faults and tokens/s of a model bigger than RAM, per budget and paging mode."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ..errors import InputError
from ..paging import ADVICE
from ..reporters.tabular import Output, add_output_options, emit, frame_records, frame_to_table, human_bytes

if TYPE_CHECKING:
    import pandas as pd

NAME = "forecast"
HELP = ("replay a trace through a model of the Linux page cache (read-around, fault-around, LRU, WILLNEED): disk "
        "bytes, major faults and tokens/s per token for each RAM budget and paging mode, and the mode to run")
DESCRIPTION = (HELP + ". --ram is the RAM left to llama.cpp's process and the page cache (e.g. MemAvailable); the "
               "KV cache (--ctx-size), compute buffers and process overhead are taken off first. Modes: stock "
               "(llama.cpp unchanged), random (MADV_RANDOM on the expert tensors, no load pass for a model that "
               "does not fit), prefetch (random + WILLNEED over the selected experts once the router has chosen). "
               "See docs/forecast.md for what the model assumes.")
ORDER = 63


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("trace", help="trace.bin of the model (gguf-experts run or capture), or another ordered trace")
    p.add_argument("--model", "-m", metavar="MODEL.gguf", required=True, help="the model the trace is of")
    p.add_argument("--ram", required=True, metavar="SIZE[,SIZE]",
                   help="RAM available to llama.cpp and the page cache, e.g. 9G or 6G,9G,13G")
    p.add_argument("--readahead", default="auto", metavar="KB|auto",
                   help="read_ahead_kb of the model's device (default auto: read from sysfs)")
    p.add_argument("--advice", default=",".join(ADVICE), metavar="MODE[,MODE]",
                   help=f"paging modes to forecast (default {','.join(ADVICE)})")
    p.add_argument("--ctx-size", "-c", type=int, default=4096, metavar="N",
                   help="llama.cpp's context size (KV cache); default 4096 (llama-server's -c)")
    p.add_argument("--measure-disk", action="store_true",
                   help="time the model file's device (O_DIRECT reads of the model, a few seconds, nothing written)")
    p.add_argument("--disk-seq", type=float, metavar="MBPS", help="sequential read speed, MB/s")
    p.add_argument("--disk-iops", type=float, metavar="N", help="4 KiB random reads per second (queue depth 1)")
    add_output_options(p)


SHOW = {"ram": "ram", "advice": "advice", "prefill_read_per_token": "prefill read/tok",
        "decode_read_per_token": "decode read/tok", "prefill_majflt_per_token": "prefill majflt/tok",
        "decode_majflt_per_token": "decode majflt/tok", "decode_hit_ratio": "decode hit",
        "prefill_tok_s": "prefill tok/s", "decode_tok_s": "decode tok/s", "load_read_bytes": "load read"}


def run(args: argparse.Namespace) -> int:
    from ..paging.disk import DEFAULT_IOPS, DEFAULT_SEQ_MBPS, DiskModel, device_io_pages, device_read_ahead_kb
    from ..paging.disk import measure_disk
    from ..paging.forecast import forecast, recommend, run_command

    budgets = parse_sizes(args.ram, "--ram")
    advice = [a.strip() for a in args.advice.split(",") if a.strip()]
    if args.readahead == "auto":
        ra = device_read_ahead_kb(args.model)
    else:
        try:
            ra = int(args.readahead)
        except ValueError:
            raise InputError(f"--readahead {args.readahead!r}: give KiB (e.g. 8192) or auto") from None
    if args.ctx_size <= 0:
        raise InputError(f"--ctx-size {args.ctx_size}: must be positive")
    if args.measure_disk:
        disk = measure_disk(args.model)
    elif args.disk_seq or args.disk_iops:
        if not (args.disk_seq and args.disk_iops) or args.disk_seq <= 0 or args.disk_iops <= 0:
            raise InputError("--disk-seq and --disk-iops go together, both positive (e.g. --disk-seq 1900 "
                             "--disk-iops 19000), or use --measure-disk")
        disk = DiskModel(args.disk_seq, args.disk_iops, "given")
    else:
        disk = DiskModel(DEFAULT_SEQ_MBPS, DEFAULT_IOPS, "assumed")
    df = forecast(args.trace, args.model, budgets, advice, readahead_kb=ra, ctx_size=args.ctx_size, disk=disk,
                  io_pages=device_io_pages(args.model, ra // 4))
    best = recommend(df)
    cmds = [{"ram": int(r.ram), "advice": r.advice, "command": run_command(r.advice, args.model, args.ctx_size)}
            for r in best.itertuples()]
    notes = _notes(df)

    def document() -> dict:
        return {"trace": args.trace, "model": args.model, **df.attrs, "rows": frame_records(df),
                "recommended": cmds, "notes": notes}

    def text() -> str:
        shown = df[list(SHOW)].rename(columns=SHOW).copy()
        for c in ("ram", "prefill read/tok", "decode read/tok", "load read"):
            shown[c] = [human_bytes(v) if v == v else v for v in shown[c]]
        out = [frame_to_table(shown, na_note="no tokens of that phase in the trace, or no disk reads and no "
                                             "measured compute time (an unbounded rate)"), ""]
        out += notes
        out += [f"recommended at {human_bytes(c['ram'])}: {c['command']}" for c in cmds]
        return "\n".join(out) + "\n"

    emit(Output(df, document=document, text=text), args.format, args.output)
    return 0


def parse_sizes(text: str, what: str) -> list[int]:
    """'6G,9.2G,13.5G' -> bytes (binary K/M/G/T suffixes, fractions allowed: people read MemAvailable as 9.2G)."""
    out = []
    for part in text.split(","):
        p = part.strip().upper().removesuffix("B").removesuffix("I")
        mult = 1
        if p and p[-1] in "KMGT":
            mult, p = 1024 ** ("KMGT".index(p[-1]) + 1), p[:-1]
        try:
            v = float(p) * mult
        except ValueError:
            raise InputError(f"{what}: {part!r} is not a size; give e.g. 9G or 6G,9.2G,13G") from None
        if not v >= 1:
            raise InputError(f"{what}: {part!r} must be a positive size")
        out.append(int(v))
    return out


def _notes(df: pd.DataFrame) -> list[str]:
    a = df.attrs
    rm, disk = a["ram_model"], a["disk"]
    comp = a["compute_s_per_token"]
    out = [f"RAM taken before the page cache: KV cache {rm['kv_bytes'] / 2**30:.2f} GiB (ctx {a['ctx_size']}), "
           f"compute buffers ~{rm['compute_bytes'] / 2**30:.2f} GiB, process ~{rm['overhead_bytes'] / 2**20:.0f} "
           f"MiB; model {a['model_bytes'] / 2**30:.2f} GiB, non-expert weights {a['nonexpert_bytes'] / 2**30:.2f} GiB",
           f"disk ({disk['source']}): {disk['seq_mbps']:.0f} MB/s sequential, {disk['iops']:.0f} IOPS at 4 KiB; "
           f"read_ahead_kb {a['readahead_kb']} (read-around {a.get('ra_pages', 0) * 4} KiB: llama.cpp's "
           "POSIX_FADV_SEQUENTIAL doubles it)"]
    if a["measured"]:
        out.append(f"compute per token from the trace's measured wall times: prefill {_secs(comp['prefill'])}, decode "
                   f"{_secs(comp['decode'])}; measured_* columns: what the traced run read at its own RAM")
        out += [f"{ph} compute from {src}" for ph, src in a.get("compute_source", {}).items()]
    else:
        out.append("the trace carries no measurements (read_bytes, majflt, wall_ns): no measured column, and "
                   "tok/s is the disk-only ceiling (compute time not included)")
    return out


def _secs(v: float | None) -> str:
    return "none (no such ubatch)" if v is None else f"{v:.4g} s"
