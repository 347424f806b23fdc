"""The client's defaults, written once: timeouts, size caps, concurrency, the result store's limits.

The contract's own figures (the service's limits, its rate limit, the price) live in ``contract.py``;
these are the client's choices. The modules that use them re-export them under their old names.
"""

# --- the transport -----------------------------------------------------------------------

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_READ_TIMEOUT = 180.0
# Base64 of the largest image the service can return (a 9.4 MP noisy PNG is ~28 MB) is
# ~38 MB; anything far past that is hostile or broken, and is not read into memory.
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
# An answer is read for as long as it arrives at least this fast (bytes/s, over each read-timeout
# window): 16 KiB/s brings the largest answer (~38 MB) in 40 minutes; slower than that is a stall.
MIN_BODY_RATE = 16 * 1024

# --- retries and pacing --------------------------------------------------------------------

DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_MAX_TOTAL_SECONDS = 300.0
DEFAULT_BASE_DELAY = 1.0
DEFAULT_MAX_DELAY = 30.0
DEFAULT_MAX_RETRY_AFTER = 90.0
# Outlasts the upstream's lock-out (contract.LOCKOUT_SECONDS): 429s are never billed.
DEFAULT_MAX_RATE_LIMITED_SECONDS = 150.0
DEFAULT_MAX_RATE_LIMITED_ATTEMPTS = 30
DEFAULT_RETRY_AFTER_JITTER = 0.2
# A probe unanswered this long after its upload was sent was not refused: a 429 comes back at once.
PROBE_GRACE_SECONDS = 2.0

# --- batches -----------------------------------------------------------------------------

ENV_MAX_CONCURRENCY = "AITHRIVING_MAX_CONCURRENCY"
# 8 in flight: a batch of 8 takes about one image's time, and 8 is far below the service's rate
# limit (contract.RATE_LIMIT_REQUESTS in contract.RATE_LIMIT_SECONDS), which the pacer enforces.
DEFAULT_MAX_CONCURRENCY = 8

# --- the result store ----------------------------------------------------------------------

ENV_STORE_DIR = "AITHRIVING_CACHE_DIR"
ENV_STORE_MAX_MB = "AITHRIVING_CACHE_MAX_MB"
DEFAULT_STORE_MAX_BYTES = 1024 * 1024 * 1024
# Delivered results of a memory-only store are a convenience cache: bounded, unlike undelivered ones.
MEMORY_STORE_BYTES = 256 * 1024 * 1024
