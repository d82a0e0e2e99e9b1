"""The one place where rqlm calls transformers' private API, under a tested version range.

Everything else in rqlm uses transformers' public API. What follows has no public equivalent; each
wrapper names the private call it makes and fails in one line, naming the supported range, when a
release has moved it.
"""

from __future__ import annotations

import transformers
from packaging.version import Version

# the transformers releases the suite passes on (pyproject.toml pins the same range)
SUPPORTED_TRANSFORMERS = ">=5.24,<5.26"


def private_api_error(name: str, error: Exception) -> RuntimeError:
    """A one-line error for a private transformers API that this release no longer has or changed."""
    return RuntimeError(
        f"transformers {transformers.__version__} changed its private {name} ({error}); rqlm supports "
        f"transformers{SUPPORTED_TRANSFORMERS}: pip install 'transformers{SUPPORTED_TRANSFORMERS}'"
    )


def transformers_version() -> Version:
    return Version(transformers.__version__)


__all__ = ["SUPPORTED_TRANSFORMERS", "private_api_error", "transformers_version"]
