"""``python -m longctx.launch`` runs the ``longctx`` command line."""

from longctx.launch.cli import main

raise SystemExit(main())
