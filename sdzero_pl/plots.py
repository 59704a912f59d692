"""``python -m sdzero_pl.plots RUN_DIR --out FIGDIR``: PNG curves of a run (:mod:`sdzero_pl.evaluation.plots`)."""

from sdzero_pl.evaluation.plots import main

if __name__ == "__main__":
    main()
