"""``tests/websocket_apps.py`` behind ``to_asgi``, for tests/test_asgi_websocket.py.

The same apps (and the same plain dispatcher, so each WebSocket also goes
through the bridge's pool thread and is adopted by the loop) as the bundled
server serves in tests/test_websocket.py; the limit is small so that the
limit tests are quick. They record to the file ``ASYNCAPP_TEST_WS_LOG``.
"""

from __future__ import annotations

import websocket_apps

from asyncapp.asgi import to_asgi

#: The largest message the apps are handed (the tests send it, and one byte more).
LIMIT = 65536

app = to_asgi(websocket_apps.app, ws_max_message_size=LIMIT)
