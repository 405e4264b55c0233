"""The jobs, and what they share above the library.

``image`` (the image job: ``jkd demo``, ``run``, ``train-teacher``, ``distill``), ``lm`` (the
language-model job: ``jkd lm demo``, ``jkd lm distill``; with ``lm_evaluation`` and ``lm_report``)
and ``compress`` (``jkd compress``). Each supplies its data, its models, its metrics and its report
rows; what they share is written here once: training one group of seeds in a run folder
(``group``), where the teacher comes from (``teacher``), the seeds' means, spreads and verdicts
(``seeds``), measuring a saved model (``measure``). The jobs use the library (``jkd.train``,
``jkd.losses``, ``jkd.models``, ``jkd.data``, ``jkd.evaluate``, ``jkd.compress``, ``jkd.export``)
and the runtime (``jkd.runtime``); nothing below imports them. ``jkd.experiment`` is kept as a
second name of ``jkd.jobs.image``.
"""
