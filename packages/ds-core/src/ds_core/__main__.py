"""``python -m ds_core`` is the ``ds`` command, whichever package owns the ``ds`` on PATH."""

from ds_core.cli import main

raise SystemExit(main())
