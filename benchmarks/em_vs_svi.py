"""EM against SVI on GMM, PPCA and LG-SSM (synthetic and real data); same as
``pyro-seqlatent em-vs-svi``.

    PYRO_SEQLATENT_DATA=../shared/data python benchmarks/em_vs_svi.py --out runs/em_vs_svi

writes ``results.json``, ``table.md`` and one log-likelihood-vs-wall-time figure per case.
"""

from __future__ import annotations

import argparse
import sys

from pyro_seqlatent.experiments.em_vs_svi import _add_arguments, _run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _add_arguments(parser)
    sys.exit(_run(parser.parse_args()))
