"""Pixels before and after the engine; Pillow and numpy only, never torch.

* ``inputs``  — input images loaded safely: data: URIs, http(s) URLs, local paths; png/jpeg/webp only,
  sniffed from the bytes; byte and pixel limits checked before decoding; EXIF orientation applied.
* ``encode``  — finished pixels to png/jpeg/webp bytes, honouring ``output_compression`` and
  ``background`` (a real alpha channel, or none at all); step previews, opaque and optionally smaller.
* ``matting`` — a subject drawn on a flat backdrop cut out into real alpha (``background=transparent``
  on local engines), and ``wants_transparency`` for ``background=auto``.
* ``metadata`` — the generation parameters written into the encoded files (png text, EXIF), no re-encode.
* ``resize``  — a render resized to exactly the requested size (premultiplied alpha, Lanczos).
* ``fit``     — input images brought into a model's limits (``InputLimits``): scaled up or padded, from a
  plan decided on width and height alone (admission), applied to the pixels when the job runs.

Import the submodule you need; this package imports nothing itself.
"""
