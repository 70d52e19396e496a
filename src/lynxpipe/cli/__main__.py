"""`python -m lynxpipe.cli ...` (torchrun launches ranks this way)."""

from lynxpipe.cli import main

main()
