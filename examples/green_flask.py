"""An ordinary Flask app whose view waits without blocking (greenlet style).

``green.app`` runs the whole Flask app in a greenlet, so plain calls deep in
the view can suspend it: ``green.sleep`` here, and on asyncapp's own hosts
also ``request.get_data()``, whose reads of ``wsgi.input`` then wait for the
body instead of blocking the server. Nothing in the view is async-aware
except the one ``green.sleep`` call. (uWSGI pre-reads the body with
``--post-buffering``, so there only the sleep suspends.)

Needs Flask (``pip install flask``). Run it, then post to it::

    asyncapp serve examples.green_flask:app
    curl --data 'hello' http://127.0.0.1:8000/
"""

from __future__ import annotations

from flask import Flask, request

from asyncapp import green

#: Seconds the view pauses, standing in for a call to a slow backend.
PAUSE = 0.1

flask_app = Flask(__name__)


@flask_app.route("/", methods=["GET", "POST"])
def index() -> tuple[str, dict[str, str]]:
    body = request.get_data()
    green.sleep(request.environ, PAUSE)
    return f"Flask got {len(body)} bytes\n", {"Content-Type": "text/plain; charset=utf-8"}


app = green.app(flask_app)


if __name__ == "__main__":
    from examples import serve

    serve(app)
