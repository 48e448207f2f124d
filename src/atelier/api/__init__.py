"""The HTTP doors, one package each: ``protocol.py`` (wire models), ``router.py`` (thin), ``service.py``.

Errors become HTTP in one place, ``atelier.api.errors``, in the shape of the door a path belongs to.
"""
