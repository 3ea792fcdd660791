"""Defaults that exist only in a source checkout (the bundled sample data, the app's model folder).

A CLI flag whose default lives in the checkout says so in its help and resolves it at run time
with `checkout_default`: inside a checkout the path, elsewhere (an installed wheel) a
LabelFactoryError asking for the flag. Nothing else in the library reads the checkout.
"""

from __future__ import annotations

from pathlib import Path

from labelfactory.errors import LabelFactoryError

_ROOT = Path(__file__).resolve().parents[2]  # <checkout>/lib/labelfactory/checkout.py -> <checkout>
SAMPLE_STUDIES = "sample-data/datastore"
APP_MODEL_DIR = "apps/labelfactory/model"


def in_checkout() -> bool:
    """Whether this package is imported from a labelfactory source checkout (not from an installed wheel)."""
    return (_ROOT / "pyproject.toml").is_file() and (_ROOT / "apps" / "labelfactory" / "main.py").is_file()


def checkout_default(relative: str, flag: str) -> Path:
    """<checkout>/`relative` when running from a checkout; else a LabelFactoryError naming `flag`."""
    if not in_checkout():
        raise LabelFactoryError(f"{flag} has a default only in a source checkout ({relative}); pass {flag} PATH")
    return _ROOT / relative
