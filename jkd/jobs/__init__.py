"""What every job (the image job, the language-model job, compression) shares above the library.

The layers, top down: the command line (``jkd.cli``) and the jobs (``jkd.experiment``,
``jkd.lm_experiment``, ``jkd.compress.job``) use this package; it uses the run folder
(``jkd.runtime.run_folder``: guard, lock, log), the fit loop and checkpoints (``jkd.train``). Nothing below
imports it. A job supplies its data, its models, its metrics and its report rows; training a group
of seeds in a run folder and comparing seeds by their spread are written here once.
"""
