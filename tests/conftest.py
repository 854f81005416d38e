"""pytest configuration: every shared fixture comes from the plugin module ``tests.support.fixtures``."""

pytest_plugins = ["tests.support.fixtures"]
