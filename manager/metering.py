"""Whether nginx can meter tokens: the njs module (Debian `libnginx-mod-http-js`) among nginx's dynamic modules.

With it, the rendering loads the module and puts nginx_templates/meter.js on the pool locations (token counts
and stream outcomes in the access log, stream_options.include_usage added for streamed OpenAI requests);
without it the configuration is the same as before metering existed and the log's token fields stay empty.
The module is tried once with `nginx -t` (a module built for another nginx version would stop nginx from
starting): per process, nginx binary and module file (its path, size and mtime), so installing or upgrading
the package is seen at the next apply.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nginx_templates import TEMPLATE_DIR

if TYPE_CHECKING:
    from manager.context import Bastion

MODULE = "ngx_http_js_module.so"
DEFAULT_MODULES = "/usr/lib/nginx/modules"  # Debian's --modules-path
ENV = "BASTION_NJS_MODULE"  # path of the module to load instead, or "off"
METER_JS = "meter.js"  # the file of a generation nginx imports (nginx_templates/meter.js)


@dataclass(frozen=True)
class Metering:
    module: str | None  # absolute path of the module to load; None: no metering
    status: str  # "njs" or "unavailable: <why>"


@functools.lru_cache(maxsize=8)
def modules_path(binary: str) -> str:
    """nginx's --modules-path (from `nginx -V`), Debian's when it cannot be told."""
    try:
        out = subprocess.run([binary, "-V"], capture_output=True, text=True, timeout=10).stderr
    except (OSError, subprocess.SubprocessError):
        return DEFAULT_MODULES
    m = re.search(r"--modules-path=(\S+)", out)
    return m.group(1) if m else DEFAULT_MODULES


@functools.lru_cache(maxsize=8)
def _loads(binary: str, module: str, _stamp: tuple[int, int]) -> str | None:
    """None when this nginx loads `module`, else nginx's reason."""
    with tempfile.TemporaryDirectory(prefix="bastion-njs-") as tmp:
        (Path(tmp) / "logs").mkdir()
        conf = Path(tmp) / "nginx.conf"
        conf.write_text(f'load_module "{module}";\nerror_log stderr;\npid nginx.pid;\nevents {{}}\n'
                        f"http {{ js_import meter from {TEMPLATE_DIR / METER_JS}; }}\n")
        try:
            proc = subprocess.run([binary, "-p", f"{tmp}/", "-c", str(conf), "-t", "-q"], capture_output=True,
                                  text=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as e:
            return str(e)
    if proc.returncode == 0:
        return None
    lines = proc.stderr.strip().splitlines() or ["nginx -t failed"]
    return next((line for line in lines if "[emerg]" in line), lines[-1])


def detect(binary: str) -> Metering:
    """Where the njs module is and whether this nginx loads it (env BASTION_NJS_MODULE: another path, or
    `off` to render without metering)."""
    wanted = os.environ.get(ENV, "")
    if wanted.lower() == "off":
        return Metering(None, f"unavailable: turned off ({ENV}=off)")
    module = Path(wanted or Path(modules_path(binary)) / MODULE)
    try:
        st = module.stat()
    except OSError:
        return Metering(None, f"unavailable: {module} not found (install libnginx-mod-http-js)")
    problem = _loads(binary, str(module), (st.st_size, st.st_mtime_ns))
    if problem:
        return Metering(None, f"unavailable: nginx cannot load {module}: {problem}")
    return Metering(str(module), "njs")


def body_edits(bastion: Bastion) -> bool:
    """Whether nginx can edit request bodies and answers (meter.js): model aliases, default models and `auto`
    need it (authsvc/aliases.py)."""
    return detect(bastion.nginx.binary).module is not None
