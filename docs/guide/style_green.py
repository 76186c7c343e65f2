"""The introduction's app with greenlets (plain calls)."""

from asyncapp import green

TEXT = [("Content-Type", "text/plain")]


@green.app
def app(environ, start_response):
    green.sleep(environ, 1)
    start_response("200 OK", TEXT)
    return [b"one second later\n"]
