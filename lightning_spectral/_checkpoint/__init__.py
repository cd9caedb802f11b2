"""Reading torch checkpoints that may be hostile: the loading policy.

Policy (documented in docs/compression.md, "Loading policy"):

1. Only regular files are opened (a FIFO, socket or device would block or never end).
2. A parse-only pre-scan of the pickle (nothing is executed or imported) refuses a pickle that
   would set attributes on a class or function, feed a tensor to a non-tensor constructor
   (``set(t)`` iterates a zero-stride view of any length), or allocate more than the memory
   budget while unpickling (``bytearray(n)``, nested ``_codecs.encode``, legacy storages):
   :mod:`~lightning_spectral._checkpoint.prescan`.
3. The file is unpickled by ``torch.load(weights_only=True)`` alone, with the few extra types
   of :data:`SAFE_LOAD_TYPES`; zip checkpoints are memory-mapped (``mmap=True``), so storages
   are read lazily, only when a computation touches them.
4. Before anything is computed, every tensor's storage and view (``numel * element_size``,
   what a contiguous copy needs) must fit in the memory budget.

``unsafe=True`` (``--unsafe-load``) replaces step 2 and weights-only unpickling by
``torch.load(weights_only=False)`` and warns; the rest still applies. Steps 1, 3 and 4 and the
loaders are in :mod:`~lightning_spectral._checkpoint.load`; the error type and the memory
budget in :mod:`~lightning_spectral._checkpoint.common`. The public names are re-exported by
:mod:`lightning_spectral.analysis`, where users import them.
"""

from __future__ import annotations

from lightning_spectral._checkpoint.common import (
    CheckpointError,
    default_max_bytes,
    format_bytes,
    parse_bytes,
)
from lightning_spectral._checkpoint.load import (
    SAFE_LOAD_TYPES,
    UnsafeLoadWarning,
    load_state_dict,
    load_torch_file,
)

__all__ = [
    "SAFE_LOAD_TYPES",
    "CheckpointError",
    "UnsafeLoadWarning",
    "default_max_bytes",
    "format_bytes",
    "load_state_dict",
    "load_torch_file",
    "parse_bytes",
]
