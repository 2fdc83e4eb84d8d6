"""``python -m pyquorum``: the same command as ``pyquorum``."""

from pyquorum.cli import main

raise SystemExit(main())
