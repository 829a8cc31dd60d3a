"""`python -m manager.cli`."""

from manager.cli import main

main()
