"""``python -m fedscan``: the command line (``fedscan.cli``)."""

from fedscan.cli import main

main()
