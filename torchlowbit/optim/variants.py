"""``variant``: the fixed-argument classes of each optimizer (``Adam8bit``, ``PagedAdam32bit``, ...)."""

from functools import partialmethod


def variant(base: type, name: str, **fixed) -> type:
    """A subclass of ``base`` named ``name`` whose constructor has the ``fixed`` keyword arguments set."""
    fixed_text = ", ".join(f"{k}={v!r}" for k, v in fixed.items())
    return type(name, (base,), {
        "__init__": partialmethod(base.__init__, **fixed),
        "__doc__": f"``{base.__name__}`` with {fixed_text}.",
        "__module__": base.__module__,
    })  # fmt: skip
