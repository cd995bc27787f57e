"""Data-parallel runs on torch.distributed (see issue 7); single-process runs skip all of it."""

from __future__ import annotations


def maybe_init(args):
    """Return a distributed context when ``--set distributed=true`` is given, else None."""
    overrides = getattr(args, "overrides", []) or []
    if any(o.replace(" ", "").lower() in ("distributed=true", "distributed=1") for o in overrides):
        from .errors import UserError

        raise UserError("distributed=true is not available in this build yet")
    return None
