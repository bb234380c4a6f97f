"""`python -m agent` is the same as the `simswarm-agent` console script."""

from agent.cli import main

raise SystemExit(main())
