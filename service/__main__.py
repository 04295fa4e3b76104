"""`python -m service ...` is the `sluice` command (serve, chat, generate, tokenize, moderate, info)."""

from service.cli import main

raise SystemExit(main())
