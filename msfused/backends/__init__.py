"""Backends of SPEC section 3. Importing this package registers every backend; each one
decides for itself, lazily, whether it is usable here."""
from . import reference  # noqa: F401  (registers)
from . import fused_cpp  # noqa: F401  (registers cpp and cuda)
from . import triton_backend  # noqa: F401  (registers triton)
from .registry import (Backend, BackendStatus, BackendUnavailableError, available_backends,
                       backend_names, get_backend, register_backend, resolve_backend)

__all__ = ["Backend", "BackendStatus", "BackendUnavailableError", "available_backends",
           "backend_names", "get_backend", "register_backend", "resolve_backend"]
