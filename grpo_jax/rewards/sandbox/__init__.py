"""Running untrusted code: namespaces, limits and a test channel (runner), the process that enters
the namespaces (launcher) and the test server inside them (server). THREAT_MODEL.md says what it
guards against and what it does not."""
