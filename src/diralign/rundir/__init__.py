"""The run directory: its schema (every file, column and key, named once), one writer and
one reader.

    python -c "import diralign.rundir as r; print(r.schema.FILES)"
"""

from . import schema
from .arraylog import ArrayLog, read_array_log
from .checkpoint import load_checkpoint_file, save_checkpoint_file
from .reader import Run, read_json
from .writer import RunWriter

__all__ = [
    "ArrayLog",
    "Run",
    "RunWriter",
    "load_checkpoint_file",
    "read_array_log",
    "read_json",
    "save_checkpoint_file",
    "schema",
]
