"""diralign: directional convergence and alignment in deep learning (Ji & Telgarsky 2020).

    python -c "import diralign; print(diralign.__all__)"

The public face is five names: ``train`` and ``resume`` (your model, your data, the same
runner and run directory as the CLI), ``load_run`` and ``Run`` (read any run directory),
``probe`` (the instrument panel of a model as it stands).  Everything else lives in
submodules (``diralign.losses``, ``diralign.maxmargin``, ``diralign.models``, ...) and is
internal unless its module says otherwise.
"""

from .errors import UserError

__all__ = ["Run", "UserError", "load_run", "probe", "resume", "train"]


def __getattr__(name):
    # Lazy (PEP 562): ``python -m diralign`` and the ``diralign`` script import this package
    # first, and the API pulls in torch; loaded here, a Ctrl-C during those seconds of imports
    # would be a traceback before the command line could turn it into one line.
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'diralign' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
