"""Cost of usage ingestion per access-log line: `python bench/usage_ingest.py [LINES]` (default 200,000).

Writes LINES lines shaped like nginx's `bastion` log_format (metered proxied requests, gate refusals) into
a temporary access log, ingests them into a fresh usage.sqlite3 and prints microseconds per line (best of 3;
CPU time of this process, which includes SQLite's work, so other load on the machine matters little).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from manager.usage import Usage
from manager.usage_log import format_record


def line(i: int) -> str:
    t = 1_764_000_000 + i / 100
    if i % 10 == 9:  # refused by the gate
        return format_record(end=f"{t:.3f}", request_id=f"{i:032x}", upstream="unix:/srv/bastion/data/run/authsvc.sock",
                             status=401, bytes_sent=312, request_length=412, duration="0.001", upstream_status="401",
                             ttfb="0.001", method="POST", uri="/v1/chat/completions",
                             remote_addr=f"203.0.113.{i % 250}")
    return format_record(end=f"{t:.3f}", request_id=f"{i:032x}", key=f"k{i % 50:011d}", model="llama3.1:8b",
                         pool="main", upstream=f"unix:/srv/bastion/data/run/authsvc.sock : 10.0.0.{i % 4}:8000",
                         status=200, bytes_sent=1000 + i % 5000, request_length=400 + i % 300, duration="1.234",
                         upstream_status="200 : 200", ttfb="0.001 : 0.120", method="POST",
                         uri="/v1/chat/completions", remote_addr=f"198.51.100.{i % 250}", outcome="completed",
                         prompt_tokens=20 + i % 100, completion_tokens=i % 500, total_tokens=20 + i % 100 + i % 500)


def main() -> None:
    lines = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    text = "".join(line(i) for i in range(lines))
    best = float("inf")
    for _ in range(3):
        with tempfile.TemporaryDirectory() as tmp:
            log = Path(tmp) / "access.log"
            log.write_text(text)
            usage = Usage(Path(tmp) / "usage.sqlite3", log)
            start = time.process_time()
            added = usage.ingest()
            best = min(best, time.process_time() - start)
            assert added == lines, added
    print(f"{lines} lines, {len(text) / lines:.0f} bytes each: {best / lines * 1e6:.2f} us/line CPU (best of 3)")


if __name__ == "__main__":
    main()
