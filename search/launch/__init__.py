"""Running a study: the plan's stages as one Ray Tune run with Optuna as the searcher
(:func:`search.launch.dispatch.launch`), its live progress view and its command line."""
