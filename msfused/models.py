"""`msfused.models`, the import path the README documents for the paper's networks, is
msfused.paper.models itself (the same module object)."""
import sys

from .paper import models as _models

sys.modules[__name__] = _models
