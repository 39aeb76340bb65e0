"""Benchmarks: ``bench_core.py`` (the byte-level core, pytest-benchmark) and ``relay`` (the
end-to-end relay against socat and HAProxy: ``python -m benchmarks.relay``)."""
