"""Backends of SPEC section 3. Importing this package registers every backend; each one
decides once, as it registers, whether it is usable here (see README.md in this folder for
how to add one)."""
from . import reference  # noqa: F401  (registers)
from . import extension  # noqa: F401  (registers cpp and cuda)
from . import triton  # noqa: F401  (registers triton, defining its operators)
from .registry import (Backend, BackendStatus, BackendUnavailableError, available_backends,
                       backend_names, get_backend, register_backend, resolve_backend)

__all__ = ["Backend", "BackendStatus", "BackendUnavailableError", "available_backends",
           "backend_names", "get_backend", "register_backend", "resolve_backend"]
