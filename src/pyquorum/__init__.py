"""pyquorum: quorum-based leader election that runs a script on exactly one master."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
