"""`python -m ds_core.cli` is the `ds` command."""

from . import main

raise SystemExit(main())
