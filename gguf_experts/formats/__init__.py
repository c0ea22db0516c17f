"""Other tools' files: one module per format (imatrix, tracer_json, reap_json, moe_trace_csv, mblt, rtrace,
csvlog), detected by content and loaded by load.py, written back by write.py; counts.py holds ExpertCounts.
Import names from their modules: this package re-exports nothing."""
