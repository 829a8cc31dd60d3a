"""Jinja2 templates of every nginx file Bastion writes (package so `pip install .` ships them)."""

from pathlib import Path

TEMPLATE_DIR = Path(__file__).parent
