"""Turn a pytest-benchmark JSON file (from bench_core.py) into a Markdown throughput table.

    python benchmarks/report.py /tmp/bench.json

Throughput = bytes per call / median time per call, in MB/s (10**6 bytes per second).
"""

from __future__ import annotations

import json
import re
import sys


def main(path: str) -> None:
    with open(path) as f:
        doc = json.load(f)
    rows: dict[str, dict[str, str]] = {}
    columns: list[str] = []
    for b in doc["benchmarks"]:
        m = re.fullmatch(r"test_(\w+)\[(\w+)-(\d+KiB)\]", b["name"])
        if not m:
            continue
        bench, impl, size = m.groups()
        if bench == "crc32c_google":
            bench = "crc32c"
        median = b["stats"]["median"]
        mbps = b["extra_info"]["bytes"] / median / 1e6
        key = f"{bench} ({impl})"
        rows.setdefault(key, {})[size] = f"{mbps:,.0f} MB/s ({median * 1e6:,.2f} µs)"
        if size not in columns:
            columns.append(size)
    columns.sort(key=lambda s: int(s[:-3]))
    print("| benchmark | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for key in rows:
        print(f"| {key} | " + " | ".join(rows[key].get(c, "–") for c in columns) + " |")
    mi = doc.get("machine_info", {})
    ci = doc.get("commit_info", {})
    print()
    print(
        f"python {mi.get('python_version')}, {mi.get('cpu', {}).get('brand_raw', '?')}, "
        f"commit {ci.get('id', '?')[:10]}{' (dirty)' if ci.get('dirty') else ''}"
    )


if __name__ == "__main__":
    main(sys.argv[1])
