"""The gunicorn worker class: ``gunicorn -k asyncapp.gunicorn.Worker``.

The public name of :mod:`asyncapp.engines.gunicorn`, where the worker
lives::

    gunicorn -k asyncapp.gunicorn.Worker -w 4 chat:app
"""

from asyncapp.engines.gunicorn import Worker

__all__ = ["Worker"]
