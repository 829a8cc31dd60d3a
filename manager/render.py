"""Templates → strings. No side effects: callers decide where the text goes."""

from __future__ import annotations

from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from nginx_templates import TEMPLATE_DIR

_env = Environment(
    loader=FileSystemLoader(TEMPLATE_DIR),
    undefined=StrictUndefined,
    keep_trailing_newline=True,
    autoescape=False,  # nginx syntax, not HTML: every value is validated before it gets here
)


def render(template: str, **context: Any) -> str:
    return _env.get_template(template).render(**context)
