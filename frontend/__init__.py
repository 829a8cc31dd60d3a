"""The admin web page, served by the manager (no Node build needed)."""

from pathlib import Path

FRONTEND_DIR = Path(__file__).parent
