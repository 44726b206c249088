"""`python -m stillroom` is the `stillroom` command."""

from stillroom.cli import main

main()
