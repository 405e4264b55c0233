"""What `make demo` (= `jkd demo`) runs.

Command: `jkd run experiments/embedded_demo/config.py` (or `jkd demo`, run folder runs/demo).
Expected: ~100 s on a 2-core CPU. Teacher (MLP 2x1200, dropout 0.2, +-2 px crops) ~97%;
student 784-100-10 alone ~94.4 +- 0.2%; soft KD (T=8) ~95.4%, DKD ~95.0%, hard KD ~94.3%
(3 seeds each, figures in docs/guides/images.md).
"""

from jkd.jobs.image import demo_config


def get_config():
    return demo_config()
