"""Browser tests: the hub's web pages in a real headless Chromium (Debian's ``chromium`` package,
driven by Playwright's sync API), with axe-core's accessibility check. See ``conftest.py``."""
