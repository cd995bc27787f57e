"""diralign: directional convergence and alignment in deep learning (Ji & Telgarsky 2020).

    python -c "import diralign; print(diralign.__all__)"

The public face is five names: ``train`` and ``resume`` (your model, your data, the same
runner and run directory as the CLI), ``load_run`` and ``Run`` (read any run directory),
``probe`` (the instrument panel of a model as it stands).  Everything else lives in
submodules (``diralign.losses``, ``diralign.maxmargin``, ``diralign.models``, ...) and is
internal unless its module says otherwise.
"""

from .api import Run, load_run, probe, resume, train
from .errors import UserError

__all__ = ["Run", "UserError", "load_run", "probe", "resume", "train"]
