"""Expert-cache simulation: LRU (lru.py), curves and working sets (cache.py), Belady's OPT (opt.py), LFUDA and
S3-FIFO (policies.py), and all of ``cache-sim`` (cachesim.py)."""
