"""Text data: where documents come from (documents: the built-in calibration.txt beside this file,
WikiText-2, C4, local files, Hub datasets) and the calibration samples and evaluation windows cut
from them (textdata).

May import: errors, settings.
"""
