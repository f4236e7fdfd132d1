"""The floor's screens: the operator station at each machine, the plant board for a wall
screen, the OEE and order pages for managers (docs/screens.md).

An entry point like the API (``hub.api``), served by the same FastAPI app under ``/ui``:
pages rendered on the server (Jinja2) with SVG charts and one small script of our own
(``static/mes.js``: requests with the CSRF token, the live stream, the taps kept while the
network is down). They read what the API reads (``hub.ui.floor`` and the API's read
functions, in its read pool) and write only through ``POST /api/v1/events``, so the rules on
the server are the API's. Devices sign in once with a key (``hub.ui.sessions``)."""
