"""Reading foreign pickles (CIFAR-10 batches, the reference study's metric files) safely.

`load_allowed` unpickles plain values (dict, list, tuple, str, bytes, numbers, None, bool) and
only the globals named in an explicit allow-list; any other global (a class or a function such
as os.system that a malicious pickle asks for) is refused with `pickle.UnpicklingError` before
anything is called. Our own files never use pickle.
"""

from __future__ import annotations

import pickle
from typing import IO

# What numpy needs to rebuild arrays and scalars, under both the numpy 1 and numpy 2 module names,
# and the helper Python 3 uses to rebuild bytes in protocol-2 pickles.
NUMPY_ARRAY_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
})
NUMPY_SCALAR_GLOBALS = frozenset({
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
})


class AllowListUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], allowed: frozenset[tuple[str, str]], **kwargs):
        super().__init__(file, **kwargs)
        self.allowed = allowed

    def find_class(self, module: str, name: str):
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f"refused to load global {module}.{name}: not in the allow-list of plain "
                                         "values and numpy arrays/scalars")
        if module == "numpy.core.multiarray":  # numpy 2 moved it; avoid the deprecated alias
            module = "numpy._core.multiarray"
        return super().find_class(module, name)


def load_allowed(file: IO[bytes], allowed: frozenset[tuple[str, str]] = frozenset(), encoding: str = "latin1"):
    """Unpickle `file`, resolving only the globals in `allowed`."""
    return AllowListUnpickler(file, allowed, encoding=encoding).load()
