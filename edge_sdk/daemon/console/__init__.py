"""The daemon's web console: live sources, events, models and device health, behind a token login.

``edge_sdk.daemon.console.routes`` serves the pages and their data; ``sessions`` keeps the logins;
``live`` keeps the latest frame of each source for the live view. The pages are hand-written
static files in ``static/`` (no build step, nothing loaded from elsewhere).
"""
