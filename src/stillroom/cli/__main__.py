"""`python -m stillroom.cli` is the `stillroom` command."""

from stillroom.cli import main

main()
