"""The people-facing summary of a byte map: bytes per component, one expert per layer, bytes per token."""
from __future__ import annotations

import pandas as pd

from ..gguf.reader import Model
from ..gguf.layout import component_summary, expert_bytes, per_token_bytes
from .tabular import frame_to_table, human_bytes


def model_table(model: Model) -> str:
    s = model.summary()
    lines = [
        f"model        {s['name']} ({s['architecture']})",
        f"layers       {s['n_layer']}  (leading dense: {s['n_leading_dense']})",
        f"experts      {s['n_expert']} routed, top-{s['n_expert_used']}, {s['n_expert_shared']} shared, "
        f"expert ff length {s['expert_ff_length']}",
    ]
    for f in s["files"]:
        lines.append(f"file         {f['file']}: {human_bytes(f['size'])} ({f['size']} bytes), data at "
                     f"{f['data_offset']}, alignment {f['alignment']}, GGUF v{f['version']} {f['byteorder']}-endian")
    comp = component_summary(model)
    comp_show = pd.DataFrame({
        "kind": comp["kind"], "tensors": comp["tensors"], "bytes": comp["bytes"],
        "size": comp["bytes"].map(human_bytes), "share": comp["share"].map(lambda x: f"{x:.1%}"),
    })
    lines += ["", "bytes per component", frame_to_table(comp_show).rstrip()]
    eb = expert_bytes(model)
    if len(eb):
        per_layer = eb.groupby("layer")["bytes"].agg(["min", "max", "count"]).reset_index()
        per_layer.columns = ["layer", "expert_bytes_min", "expert_bytes_max", "experts"]
        per_layer["one_expert"] = per_layer["expert_bytes_max"].map(human_bytes)
        lines += ["", "bytes of one expert per layer", frame_to_table(per_layer, max_rows=64).rstrip()]
    pt = per_token_bytes(model, eb)
    if pt["model_bytes"]:
        lines += [
            "",
            f"bytes read per token at top-{pt['n_expert_used']}: {human_bytes(pt['bytes_per_token'])} "
            f"(experts {human_bytes(pt['expert_bytes_per_token'])} "
            f"+ non-expert weights {human_bytes(pt['nonexpert_bytes_per_token'])})"
            f" of {human_bytes(pt['model_bytes'])} in the model "
            f"({pt['bytes_per_token'] / pt['model_bytes']:.1%})",
        ]
    return "\n".join(lines) + "\n"
