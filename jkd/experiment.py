"""The image job under its first name, kept so that experiment config files written for it still
import: ``jkd.experiment`` is the module :mod:`jkd.jobs.image` itself (one module, two names)."""

import sys

from jkd.jobs import image as _image

sys.modules[__name__] = _image
