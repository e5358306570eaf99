"""How much memory tftransfer may use for caches (images, backbone features).

The budget is ``DEFAULT_SHARE`` of the machine's RAM (10%: 2.4 GiB on a
24 GiB machine), or the value of the environment variable
``TFTRANSFER_CACHE_BUDGET`` (bytes, or with a unit: ``"512MB"``, ``"2GiB"``,
or a share of RAM: ``"0.25"``), or a ``cache_budget=`` argument where one is
taken. A cache that would exceed it is not kept in memory.

Example:
    >>> os.environ["TFTRANSFER_CACHE_BUDGET"] = "1GB"
    >>> budget()
    1000000000
"""

import os
import re

import psutil

from tftransfer._checks import invalid

ENV = "TFTRANSFER_CACHE_BUDGET"
DEFAULT_SHARE = 0.10
_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse(value, arg: str = "cache_budget") -> int:
    """Bytes from an int, ``"<number><unit>"`` or a share of RAM in (0, 1]."""
    text = str(value).strip().lower()
    match = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)", text)
    if isinstance(value, bool) or not match or match.group(2) not in _UNITS:
        raise invalid(arg, "bytes (an int >= 0, or a string like '512MB' or '2GiB') or a "
                      "share of RAM in (0, 1] like '0.1'", value)
    number, unit = float(match.group(1)), match.group(2)
    if not unit and 0 < number <= 1 and "." in text:
        return int(number * psutil.virtual_memory().total)
    return int(number * _UNITS[unit])


def budget(override=None) -> int:
    """The cache budget in bytes: ``override``, else ``$TFTRANSFER_CACHE_BUDGET``,
    else ``DEFAULT_SHARE`` of total RAM."""
    if override is not None:
        return parse(override)
    if os.environ.get(ENV):
        return parse(os.environ[ENV], ENV)
    return int(DEFAULT_SHARE * psutil.virtual_memory().total)


def show(nbytes: float) -> str:
    """``1.5 GB``-style text for a byte count."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= size:
            return f"{nbytes / size:.3g} {unit}"
    return f"{int(nbytes)} B"
