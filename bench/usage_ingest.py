"""Cost of usage ingestion per access-log line: `python bench/usage_ingest.py [LINES]` (default 200,000).

Writes LINES lines shaped like nginx's `bastion` log_format (proxied requests with retries, gate refusals) into
a temporary access log, ingests them into a fresh usage.sqlite3 and prints microseconds per line (best of 3;
CPU time of this process, which includes SQLite's work, so other load on the machine matters little).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from manager.usage import Usage


def line(i: int) -> str:
    t = 1_764_000_000 + i / 100
    if i % 10 == 9:  # refused by the gate
        return (f'{{"time":{t:.3f},"request_id":"{i:032x}","key":"","model":"","pool":"",'
                f'"upstream":"unix:/srv/bastion/data/run/authsvc.sock","status":401,"bytes_sent":312,'
                f'"request_length":412,"request_time":0.001,"upstream_status":"401","upstream_header_time":"0.001",'
                f'"upstream_response_time":"0.001","method":"POST","uri":"/v1/chat/completions",'
                f'"remote_addr":"203.0.113.{i % 250}"}}\n')
    return (f'{{"time":{t:.3f},"request_id":"{i:032x}","key":"k{i % 50:011d}","model":"llama3.1:8b",'
            f'"pool":"main","upstream":"unix:/srv/bastion/data/run/authsvc.sock : 10.0.0.{i % 4}:8000",'
            f'"status":200,"bytes_sent":{1000 + i % 5000},"request_length":{400 + i % 300},"request_time":1.234,'
            f'"upstream_status":"200 : 200","upstream_header_time":"0.001 : 0.120",'
            f'"upstream_response_time":"0.001 : 1.230","method":"POST","uri":"/v1/chat/completions",'
            f'"remote_addr":"198.51.100.{i % 250}"}}\n')


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
