"""Pure analyses of routing traces over numpy arrays: statistics, reuse, cache simulation, working sets, REAP.

Every function takes the row-aligned TraceData arrays (or chunks of them) and returns arrays, DataFrames or
dicts; nothing here reads files, prints or exits (commands do that).
"""
from __future__ import annotations
