"""The error every image reader raises, in a module of its own.

Both the reader (``imageio``) and the compressed-stream checks it runs first
(``dicom_codestream``) raise it; defined here, neither has to import the other's module back.
"""

from __future__ import annotations


class ImageReadError(ValueError):
    """An image file could not be turned into a 2-D X-ray array; the message names file and cause."""
