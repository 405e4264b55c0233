"""``python -m jkd.cli``: the console script's ``jkd``."""

from jkd.cli import main

raise SystemExit(main())
